"""Wall and CPU time of ``bncupy demo`` and ``bncupy demo --quick``, as a user runs them.

usage: python benchmarks/demo_timing.py [--reps N] [--backend numpy] [--also-blas-threads T]

Each run is a fresh ``python -m bncupy demo`` process (imports, training, figures and
explorer.html included), full and quick runs alternating so both see the same machine state.
Wall time is measured around the process, CPU time is the child's user + system time
(``os.wait4``), and the load average is read before each run: on a shared machine the wall time
of one run says little alone, the CPU time and the spread over runs say more. The numbers quoted
in the docs' demo page (docs/guide/demo.md) and in ``bncupy demo --help`` come from this script.

``--also-blas-threads T`` adds runs of the same demo with its BLAS thread limit set to ``T``
instead of ``bncupy.demo.BLAS_THREADS`` (1), to show what the limit is worth on this machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# Keep glibc from trimming and re-faulting the heap between runs' allocations.
TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"


def timed_run(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one child process; raises if it fails."""
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: progress bars never block
        start = time.perf_counter()
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                               f"{stderr.read().decode(errors='replace')}")
    return wall, usage.ru_utime + usage.ru_stime


def demo_command(extra: list[str], out: str, blas_threads: int | None) -> list[str]:
    """``python -m bncupy demo ...``, or the same through ``bncupy._cli.main`` with the demo's
    BLAS thread limit replaced."""
    if blas_threads is None:
        return [sys.executable, "-m", "bncupy", "demo", *extra, "--out", out]
    code = ("import sys, bncupy.demo, bncupy._cli; bncupy.demo.BLAS_THREADS = int(sys.argv[1]); "
            "sys.exit(bncupy._cli.main(sys.argv[2:]))")
    return [sys.executable, "-c", code, str(blas_threads), "demo", *extra, "--out", out]


def summary(name: str, runs: list[tuple[float, float, float]]) -> str:
    walls = [w for w, _, _ in runs]
    cpus = [c for _, c, _ in runs]
    loads = [load for _, _, load in runs]
    return (f"{name:>17}: wall median {statistics.median(walls):6.1f} s "
            f"(range {min(walls):.1f}-{max(walls):.1f}), CPU median "
            f"{statistics.median(cpus):6.1f} s (range {min(cpus):.1f}-{max(cpus):.1f}), "
            f"load average before runs {min(loads):.1f}-{max(loads):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="runs of each kind (default 3)")
    parser.add_argument("--backend", default="numpy", help="BNCUPY_BACKEND for the runs")
    parser.add_argument("--also-blas-threads", type=int, default=None, metavar="T",
                        help="also time the demo with T BLAS threads instead of its 1")
    args = parser.parse_args()
    env = dict(os.environ, GLIBC_TUNABLES=TUNABLES, BNCUPY_BACKEND=args.backend,
               TQDM_DISABLE="1")
    kinds: dict[str, tuple[list[str], int | None]] = {"demo --quick": (["--quick"], None),
                                                      "demo": ([], None)}
    if args.also_blas_threads is not None:
        t = args.also_blas_threads
        kinds |= {f"--quick, {t} BLAS": (["--quick"], t), f"demo, {t} BLAS": ([], t)}
    runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
    print(f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, backend {args.backend}")
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for i, (name, (extra, blas_threads)) in enumerate(kinds.items()):
                load = os.getloadavg()[0]
                wall, cpu = timed_run(demo_command(extra, f"{tmp}/{rep}-{i}", blas_threads), env)
                runs[name].append((wall, cpu, load))
                print(f"  {name:>17} run {rep + 1}: wall {wall:6.1f} s, CPU {cpu:6.1f} s, "
                      f"load average before {load:.1f}", flush=True)
    for name, values in runs.items():
        print(summary(name, values))


if __name__ == "__main__":
    main()

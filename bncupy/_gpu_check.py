"""``bncupy gpu-check``: the prepared GPU proof, one command from the repository root.

Phases, each in its own process under its own time limit; a phase that fails or runs out of
time is recorded and the next one still runs:

1. ``env``: device, driver, versions, SM count, measured copy bandwidth, backend self-check;
2. ``suite``: the test suite's CuPy cases (``-m gpu``), counts kept;
3. ``sanitizer``: compute-sanitizer memcheck, racecheck, initcheck and synccheck over
   ``benchmarks/gpu_driver.py`` (every op, dtype, layout, vector and scalar paths, fused);
4. ``streams``: ``benchmarks/gpu_concurrency.py`` (threads on streams and on the per-thread
   default stream, a CUDA-graph replay, torch's streams, one-rank NCCL SyncBatchNorm);
5. ``bench``: bncupy vs torch (cuDNN on and off) vs naive CuPy, host time per call, roofline.

The record (design notes, section 4) is written to ``--out`` with every phase's outcome, and a
one-screen summary is printed last. At most 8 files go to ``--out``. ``--rehearse`` runs the
same code on the CPU execution target with stand-in timers (CI's rehearsal; compute-sanitizer
is then reported "not available").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Seconds per phase on an H200, cold NVRTC compiles included (9 minutes in all).
LIMITS = {"env": 60, "suite": 130, "sanitizer": 170, "streams": 35, "bench": 120}
SANITIZER_TOOLS = {"memcheck": 45, "racecheck": 70, "initcheck": 35, "synccheck": 20}
PHASES = tuple(LIMITS)


def _run(command: list[str], log: Path, limit: float, env: dict[str, str] | None = None,
         ) -> dict[str, Any]:
    """Run ``command`` appending to ``log``; at the limit SIGINT (pytest then still writes its
    report), then SIGKILL 10 s later. Returns rc, seconds and whether it timed out."""
    start = time.monotonic()
    with log.open("a") as out:
        out.write(f"=== {' '.join(command)} (limit {limit:.0f} s)\n")
        out.flush()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, **(env or {})})
        timed_out = False
        try:
            proc.wait(timeout=max(limit, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {"rc": proc.returncode, "seconds": round(time.monotonic() - start, 1),
            "timed_out": timed_out}


def _python(module_or_script: str, *args: str) -> list[str]:
    if module_or_script.endswith(".py"):
        return [sys.executable, str(REPO / module_or_script), *args]
    return [sys.executable, "-m", module_or_script, *args]


def _junit_counts(path: Path) -> dict[str, int] | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                               "skipped")}
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"] + total["errors"], "skipped": total["skipped"]}


def phase_suite(out: Path, limit: float, rehearse: bool) -> dict[str, Any]:
    xml = out / "suite.xml"
    args = ["-p", "no:cacheprovider", "-m", "gpu", "-q", "-rfEs", "-o", "addopts=",
            f"--junitxml={xml}"]
    if _has_module("pytest_timeout"):
        args.append("--timeout=60")
    targets = ["tests/test_kernels.py", "-k", "every_path and float32"] if rehearse \
        else ["tests"]
    result = _run(_python("pytest", *args, *targets), out / "suite.log", limit,
                  {"BNCUPY_EMULATED": "1"} if rehearse else {"BNCUPY_REQUIRE": "gpu"})
    counts = _junit_counts(xml)
    return {**result, "command": "python3 -m pytest -m gpu tests", **(counts or {}),
            "ok": counts is not None and counts["failed"] == 0 and not result["timed_out"]}


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _sanitizer_summary(text: str) -> int | None:
    """Errors (or hazards) in the last compute-sanitizer summary line of ``text``."""
    for line in reversed(text.splitlines()):
        if "ERROR SUMMARY:" in line or "RACECHECK SUMMARY:" in line:
            words = line.split(":", 1)[1].split()
            return int(words[0]) if words and words[0].isdigit() else None
    return None


def phase_sanitizer(out: Path, limit: float, rehearse: bool) -> dict[str, Any]:
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if rehearse or not Path(tool).exists():
        return {"outcome": "not available", "ok": None}
    log = out / "sanitizer.log"
    results: dict[str, Any] = {}
    scale = limit / sum(SANITIZER_TOOLS.values())
    for name, seconds in SANITIZER_TOOLS.items():
        before = log.stat().st_size if log.exists() else 0
        result = _run([tool, "--tool", name, "--error-exitcode", "9", "--print-limit", "20",
                       *_python("benchmarks/gpu_driver.py")], log, seconds * scale)
        text = log.read_text(errors="replace")[before:]
        result["errors"] = _sanitizer_summary(text)
        result["mismatches"] = "0 mismatches" not in text
        results[name] = result
    results["ok"] = all(r["rc"] == 0 and r["errors"] == 0 and not r["timed_out"]
                        for r in results.values() if isinstance(r, dict))
    return results


def phase_streams(out: Path, limit: float, rehearse: bool, tmp: Path) -> dict[str, Any]:
    extra = ["--emulated"] if rehearse else []
    log = out / "streams.log"
    first = _run(_python("benchmarks/gpu_concurrency.py", "--out", str(tmp / "streams.json"),
                         *extra), log, limit * 0.7)
    second = _run(_python("benchmarks/gpu_concurrency.py", "--per-thread", "--out",
                          str(tmp / "per-thread.json"), *extra), log, limit * 0.3,
                  {"CUPY_CUDA_PER_THREAD_DEFAULT_STREAM": "1"})
    checks: dict[str, Any] = {}
    for name in ("streams.json", "per-thread.json"):
        if (tmp / name).exists():
            checks.update(json.loads((tmp / name).read_text()))
    return {"runs": [first, second], "checks": checks,
            "ok": bool(checks) and all(c["outcome"] in ("pass", "skip")
                                       for c in checks.values())
            and not (first["timed_out"] or second["timed_out"])}


def _child(phase: str, tmp: Path, quick: bool, rehearse: bool) -> None:
    """The in-process phases (env, bench), run in a child process of the GPU check."""
    from ._bench import (
        GPU_TIMERS,
        TRANSFORMER,
        base_record,
        bench_configs,
        bench_rows,
        copy_bandwidth_gbps,
        cuda_torch,
        family_rows,
        fused_rows,
        print_table,
        summarize,
        transformer_configs,
        transformer_rows,
    )
    if rehearse:
        sys.path.insert(0, str(REPO))
        from tests import emulated

        emulated.install()
    from .backends import cupy as cupy_backend

    cupy = cupy_backend.require()
    torch = None if rehearse else cuda_torch()
    if phase == "env":
        from ._cli import info

        record = base_record(cupy, torch) if not rehearse else _rehearsal_record(torch)
        smi = shutil.which("nvidia-smi")
        if smi:
            query = "name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw"
            print(subprocess.run([smi, f"--query-gpu={query}", "--format=csv"],
                                 capture_output=True, text=True, check=False).stdout, flush=True)
        record["copy_bandwidth_GBps"] = 1000.0 if rehearse else round(copy_bandwidth_gbps(cupy),
                                                                     1)
        record["self_check_status"] = info()
        (tmp / "env.json").write_text(json.dumps(record))
        if not rehearse:  # after the record is safe: a slow compile cannot lose it
            record["kernel_compile_seconds"] = _warm_kernel_cache()
            (tmp / "env.json").write_text(json.dumps(record))
        return
    env = json.loads((tmp / "env.json").read_text())
    copy_gbps = env["copy_bandwidth_GBps"]
    reps = 5 if quick else 20
    configs = bench_configs(small=True)
    if rehearse:  # the real timers on the CPU target's events: every code path, no figure
        reps = 2
        configs = [("NCHW", "float32", (2, 8, 4, 4)), ("NHWC", "float16", (2, 8, 4, 4))]
    from .backends.dispatch import use_backend

    result: dict[str, Any] = {}

    def save(**sections: Any) -> None:  # after each section: a phase cut short keeps the rest
        result.update(sections)
        (tmp / "bench.json").write_text(json.dumps(result))

    with use_backend("cupy"):
        rows = bench_rows(cupy, torch, copy_gbps, configs, reps, GPU_TIMERS)
        print_table(rows)
        save(summary=summarize(rows), bench=rows)
        shapes = [(4, 64)] if rehearse else TRANSFORMER
        save(transformer=transformer_rows(
            cupy, torch, copy_gbps, transformer_configs(quick, shapes), reps, GPU_TIMERS,
            compile_=not quick and not rehearse))
        save(family=[] if rehearse else family_rows(cupy, torch, reps, quick=quick,
                                                    host=GPU_TIMERS.host))
        save(fused=fused_rows(cupy, reps, GPU_TIMERS, ((2, 8, 4, 4),) if rehearse else
                              ((32, 64, 56, 56), (32, 256, 56, 56), (32, 1024, 14, 14))))


def _warm_kernel_cache() -> float:
    """Compile every dtype's kernel module at once, one process each, into CuPy's on-disk
    cache: the later phases load them instead of compiling one after another."""
    from .backends._cuda import CTYPES

    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    code = "import sys; from bncupy.backends import _cuda; _cuda._module(0, sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, dtype], env=env)
             for dtype in CTYPES]
    for proc in procs:
        proc.wait()
    return round(time.perf_counter() - t0, 1)


def _rehearsal_record(torch: Any) -> dict[str, Any]:
    import datetime as _dt

    from ._bench import commit
    from ._kernels import kernels_digest

    return {"kernels_digest": kernels_digest(), "commit": commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": {"name": "CPU execution target (rehearsal)", "compute_capability": "0",
                       "memory_bytes": 0, "sm_count": 132},
            "versions": {"python": sys.version.split()[0], "torch": None},
            "rehearsal": True}


def main(out: Path, phases: list[str] | tuple[str, ...] = PHASES, quick: bool = False,
         rehearse: bool = False, scale: float = 1.0) -> int:
    """Run ``phases`` and write the GPU record to ``out``; 0 when every phase that ran passed.

    Raises
    ------
    BackendUnavailableError
        Without ``rehearse``, where the CuPy backend cannot run (saying what is missing).
    """
    if not rehearse:
        from .backends import cupy as cupy_backend

        cupy_backend.require()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, Any] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        flags = [*(["--quick"] if quick else []), *(["--rehearse"] if rehearse else [])]
        for phase in phases:
            limit = LIMITS[phase] * scale
            print(f"gpu-check: {phase} (limit {limit:.0f} s)", flush=True)
            if phase == "suite":
                outcome[phase] = phase_suite(out, limit, rehearse)
            elif phase == "sanitizer":
                outcome[phase] = phase_sanitizer(out, limit, rehearse)
            elif phase == "streams":
                outcome[phase] = phase_streams(out, limit, rehearse, tmp)
            else:
                log = out / ("summary.txt" if phase == "env" else "bench.log")
                result = _run(_python("bncupy._gpu_check", "--child", phase, "--tmp", str(tmp),
                                      *flags), log, limit)
                produced = tmp / f"{phase}.json"
                result["ok"] = produced.exists() and result["rc"] == 0
                outcome[phase] = result
        record = _assemble(tmp, outcome, rehearse)
    record["phases"]["total_seconds"] = round(time.monotonic() - started, 1)
    from ._bench import record_path

    path = record_path(out, record)
    path.write_text(json.dumps(record, indent=1) + "\n")
    summary = _summary(record, path)
    with (out / "summary.txt").open("a") as f:
        f.write(summary + "\n")
    print(summary)
    ran = [p for p in phases if isinstance(outcome.get(p), dict)]
    return 0 if all(outcome[p].get("ok") in (True, None) for p in ran) else 1


def _assemble(tmp: Path, outcome: dict[str, Any], rehearse: bool) -> dict[str, Any]:
    env = json.loads((tmp / "env.json").read_text()) if (tmp / "env.json").exists() else {
        "device": {"name": "unknown"}, "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00")}
    if "kernels_digest" not in env:
        from ._kernels import kernels_digest

        env["kernels_digest"] = kernels_digest()
    bench = json.loads((tmp / "bench.json").read_text()) if (tmp / "bench.json").exists() \
        else {}
    suite = outcome.get("suite", {})
    return {**env,
            "suite": {k: suite.get(k) for k in ("command", "passed", "failed", "skipped")}
            if suite else None,
            "phases": outcome, **bench}


def _summary(record: dict[str, Any], path: Path) -> str:
    lines = [f"GPU record: {path}", f"device: {record['device'].get('name')}; kernels "
             f"{record.get('kernels_digest', '?')[:12]}; copy "
             f"{record.get('copy_bandwidth_GBps', '?')} GB/s"]
    shown = ("passed", "failed", "skipped", "seconds", "outcome")
    for name, result in record["phases"].items():
        if isinstance(result, dict):
            facts = {k: v for k, v in result.items() if k in shown}
            checks = result.get("checks") or {}
            facts.update({k: v["outcome"] for k, v in checks.items()})
            facts.update({k: f"rc={v['rc']} errors={v['errors']}" for k, v in result.items()
                          if k in SANITIZER_TOOLS})
            lines.append(f"  {name}: ok={result.get('ok')} "
                         f"{'TIMED OUT ' if result.get('timed_out') else ''}{json.dumps(facts)}")
    for key, value in (record.get("summary") or {}).items():
        lines.append(f"  {key}: {value}")
    rows = record.get("bench") or []
    worst = sorted((r for r in rows if r.get("torch_us")),
                   key=lambda r: r["torch_us"] / r["bncupy_us"])[:5]
    for r in worst:
        lines.append(f"  worst vs torch: {r['op']} {r['layout']} {r['dtype']} {r['shape']}: "
                     f"{r['bncupy_us']} us vs {r['torch_us']} us (device {r['bncupy_device_us']},"
                     f" host {r['bncupy_host_us']} vs {r['torch_host_us']})")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bncupy gpu-check", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated subset of {', '.join(PHASES)}")
    parser.add_argument("--quick", action="store_true", help="5 repetitions per timing")
    parser.add_argument("--rehearse", action="store_true",
                        help="the CPU execution target with stand-in timers (no GPU)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every time limit")
    parser.add_argument("--child", choices=("env", "bench"), help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.tmp, args.quick, args.rehearse)
        return 0
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}; choose from {', '.join(PHASES)}")
    from ._errors import BackendUnavailableError

    try:
        return main(args.out, phases, args.quick, args.rehearse, args.scale)
    except BackendUnavailableError as exc:
        print(f"bncupy gpu-check needs a GPU (or --rehearse): {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())

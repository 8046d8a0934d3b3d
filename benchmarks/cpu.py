"""bncupy's NumPy backend against torch-CPU and a naive NumPy implementation, same machine.

usage: python benchmarks/cpu.py [--threads 1 2] [--blocks 3] [--calls 3] [--data-only] [--json FILE]
       python benchmarks/cpu.py --summary RUN.json | --compare RUN1.json RUN2.json
       python benchmarks/cpu.py --readme RUN1.json RUN2.json

bncupy runs twice in each row: as installed by default (``bncupy``: the compiled engine where
Numba is installed) and without Numba (``nonumba``: ``BNCUPY_CPU_ENGINE=numpy``, the pure-NumPy
engine).

Every op (forward-train, forward-eval, backward) x shape x layout x data distribution
(zero-mean, offset x + 5, post-ReLU) x dtype (float32, float16), once per thread count (1 =
per core; BNCUPY_NUM_THREADS and torch.set_num_threads alike; naive NumPy is single-threaded).
The implementations are timed in alternating blocks of ``--calls`` calls (a warm-up call first;
naive NumPy, several times slower, in the first block only), each block started once the
machine is idle (other processes below a quarter of a core, or after 0.2 s of waiting: the load
seen is reported). A row gives the median wall time per call; the median over blocks of the
process CPU time per call (all threads of this process, counted until 50 ms after the block's
last call, so that threads left spinning are charged to the library that left them: CPU well
above threads x wall means oversubscription); the CPU burnt in those 50 ms alone; the ratios
torch/bncupy and naive/bncupy for both engines, and the spread of the torch ratio over the
blocks ((max - min) / median of the per-block ratios). Then each engine alone, one thread, times
the data distributions (and x + 1e4 in float32) against each other in alternating blocks: the
slowest / fastest ratio per case is the data dependence. ``--data-only`` runs just that;
``--summary`` reprints a saved run's summary; ``--compare`` prints the run-to-run spread of two
saved runs; ``--readme`` prints the tables of docs/guide/performance.md from two saved runs.
torch is optional (``pip install torch==2.13.0``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
if os.environ.get("GLIBC_TUNABLES") != TUNABLES:  # keep glibc from trimming the heap per call
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": TUNABLES})

import bncupy as bn  # noqa: E402
from bncupy.backends import numpy as numpy_backend  # noqa: E402

SHAPES = [(32, 64, 56, 56), (256, 64, 14, 14), (32, 512, 7, 7), (8, 256, 28, 28), (1024, 256)]
OPS = ("fwd_train", "fwd_eval", "bwd")
ENGINES = ("bncupy", "nonumba")  # as installed by default; the pure-NumPy engine
DATA = ("zero-mean", "offset", "post-relu")
EPS = 1e-5


def busy_cores(interval: float = 0.05) -> float:
    """Cores kept busy by the whole machine over ``interval`` seconds (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    (t0, i0), _ = sample(), time.sleep(interval)
    t1, i1 = sample()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))


def wait_idle(log: list[float], limit: float = 0.2) -> None:
    start = time.perf_counter()
    while True:
        busy = busy_cores()
        if busy < 0.25 or time.perf_counter() - start > limit:
            log.append(busy)
            return


def time_block(fn: Callable[[], Any], calls: int, tail: float = 0.05,
               ) -> tuple[list[float], float, float]:
    """Wall time of each of ``calls`` calls (after a warm-up call); process CPU time per call,
    counted until ``tail`` seconds after the last call, so that CPU burnt by threads still
    spinning after returning (and threads whose time the kernel books late) is included; and
    the CPU time of that tail alone."""
    fn()
    wall = []
    c0 = time.process_time()
    for _ in range(calls):
        w0 = time.perf_counter()
        fn()
        wall.append(time.perf_counter() - w0)
    c1 = time.process_time()
    time.sleep(tail)
    c2 = time.process_time()
    return wall, (c2 - c0) / calls, c2 - c1


def make_data(shape: tuple[int, ...], kind: str, dtype: Any, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape, np.float32)
    x = {"zero-mean": x, "offset": x + 5, "offset 1e4": x + 1e4, "post-relu": np.maximum(x, 0)}[kind]
    return x.astype(dtype)


def without_numba(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` on the pure-NumPy engine, as an install without Numba runs it."""
    def call() -> Any:
        os.environ["BNCUPY_CPU_ENGINE"] = "numpy"
        try:
            return fn()
        finally:
            del os.environ["BNCUPY_CPU_ENGINE"]
    return call


def naive_ops(x: np.ndarray, dy: np.ndarray, axis: int, w: np.ndarray, b: np.ndarray,
              rm: np.ndarray, rv: np.ndarray) -> dict[str, Callable[[], Any]]:
    """Textbook NumPy: ``x.mean``/``x.var`` and broadcast elementwise expressions (float16 is
    computed in float32, as bncupy does)."""
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = -1

    def f32(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32) if a.dtype == np.float16 else a

    wb, bb, rmb, rvb = (v.reshape(shape) for v in (w, b, rm, rv))

    def train() -> np.ndarray:
        xf = f32(x)
        m, v = xf.mean(axis=axes, keepdims=True), xf.var(axis=axes, keepdims=True)
        return ((xf - m) / np.sqrt(v + EPS) * wb + bb).astype(x.dtype)

    def evaluate() -> np.ndarray:
        return ((f32(x) - rmb) / np.sqrt(rvb + EPS) * wb + bb).astype(x.dtype)

    def backward() -> tuple[np.ndarray, ...]:
        xf, g = f32(x), f32(dy)
        m, invstd = xf.mean(axis=axes, keepdims=True), 1 / np.sqrt(xf.var(axis=axes, keepdims=True) + EPS)
        xhat = (xf - m) * invstd
        n = x.size // x.shape[axis]
        db, dw = g.sum(axis=axes, keepdims=True), (g * xhat).sum(axis=axes, keepdims=True)
        return ((g - db / n - xhat * dw / n) * (wb * invstd)).astype(x.dtype), dw, db

    return {"fwd_train": train, "fwd_eval": evaluate, "bwd": backward}


def case_ops(shape: tuple[int, ...], layout: str, dtype: Any, kind: str,
             torch: Any) -> dict[str, dict[str, Callable[[], Any]]]:
    """{op: {impl: callable}} for one case; NHWC is bncupy ``axis=-1`` / torch channels_last."""
    c = shape[1]
    x_nc = make_data(shape, kind, dtype, 0)
    dy_nc = make_data(shape, "zero-mean", dtype, 1)
    to_last = layout == "NHWC"
    x = np.ascontiguousarray(np.moveaxis(x_nc, 1, -1)) if to_last else x_nc
    dy = np.ascontiguousarray(np.moveaxis(dy_nc, 1, -1)) if to_last else dy_nc
    axis = -1 if to_last else 1
    rng = np.random.default_rng(2)
    w, b = rng.uniform(0.5, 2, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    m, v = bn.moments(x, axis=axis)
    rm, rv = m.astype(np.float32), v.astype(np.float32)
    save_mean, save_invstd = m, (1 / np.sqrt(v + EPS)).astype(np.float32)
    ops: dict[str, dict[str, Callable[[], Any]]] = {op: {} for op in OPS}
    rm_b, rv_b = rm.copy(), rv.copy()
    bncupy = {"fwd_train": lambda: bn.batch_norm(x, rm_b, rv_b, w, b, True, axis=axis),
              "fwd_eval": lambda: bn.batch_norm(x, rm, rv, w, b, False, axis=axis),
              "bwd": lambda: bn.batch_norm_backward(dy, x, w, save_mean, save_invstd, axis=axis)}
    for op, fn in bncupy.items():
        ops[op]["bncupy"] = fn
        ops[op]["nonumba"] = without_numba(fn)
    if torch is not None:
        tx, tdy = torch.from_numpy(x_nc), torch.from_numpy(dy_nc)
        if to_last:
            tx, tdy = (t.contiguous(memory_format=torch.channels_last) for t in (tx, tdy))
        tw, tb, trm, trv, tsm, tsi = (torch.from_numpy(a.astype(dtype)) for a in
                                      (w, b, rm, rv, save_mean, save_invstd))
        trm_b, trv_b = trm.clone(), trv.clone()
        F = torch.nn.functional
        ops["fwd_train"]["torch"] = lambda: F.batch_norm(tx, trm_b, trv_b, tw, tb, True)
        ops["fwd_eval"]["torch"] = lambda: F.batch_norm(tx, trm, trv, tw, tb, False)
        ops["bwd"]["torch"] = lambda: torch.ops.aten.native_batch_norm_backward(
            tdy, tx, tw, trm, trv, tsm, tsi, True, EPS, [True, True, True])
    for op, fn in naive_ops(x, dy, axis, w, b, rm, rv).items():
        ops[op]["naive"] = fn
    return ops


def measure(fns: dict[str, Callable[[], Any]], blocks: int, calls: int, load: list[float],
            ) -> dict[str, Any]:
    wall: dict[str, list[list[float]]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    spin: dict[str, list[float]] = {k: [] for k in fns}
    for block in range(blocks):
        for name, fn in fns.items():
            if name == "naive" and block:
                continue  # one block: naive NumPy is several times slower, the margin is wide
            wait_idle(load)
            w, c, s = time_block(fn, calls)
            wall[name].append(w)
            cpu[name].append(c)
            spin[name].append(s)
    row: dict[str, Any] = {}
    for name in fns:
        row[f"{name}_ms"] = 1e3 * float(np.median(np.concatenate(wall[name])))
        row[f"{name}_cpu_ms"] = 1e3 * float(np.median(cpu[name]))
        row[f"{name}_spin_ms"] = 1e3 * max(spin[name])
    for other in ("torch", "naive"):
        for ours in ENGINES:
            if other in fns and ours in fns:
                ratios = [np.median(o) / np.median(us) for o, us in
                          zip(wall[other], wall[ours], strict=False)]
                key = f"{other}_ratio" if ours == "bncupy" else f"{other}_{ours}_ratio"
                row[key] = row[f"{other}_ms"] / row[f"{ours}_ms"]
                row[key.replace("ratio", "spread")] = float((max(ratios) - min(ratios))
                                                            / np.median(ratios))
    return row


def data_check(args: argparse.Namespace, load: list[float]) -> list[dict[str, Any]]:
    """Each engine alone, one thread, the data distributions timed against each other in
    alternating blocks: slowest / fastest median per op, shape, layout and dtype (float16 data
    cannot hold x + 1e4 to any precision, so it is left out there)."""
    os.environ["BNCUPY_NUM_THREADS"] = "1"
    rows = []
    for engine in ENGINES:
        print(f"\ndata dependence: {engine}, 1 thread, distributions in alternating blocks "
              "(slowest / fastest median wall; process CPU)")
        for shape, layout, dtype in cases(args):
            kinds = [*DATA, "offset 1e4"] if dtype == "float32" else list(DATA)
            ops = {kind: case_ops(shape, layout, np.dtype(dtype), kind, None) for kind in kinds}
            for op in OPS:
                row = measure({kind: ops[kind][op][engine] for kind in kinds}, args.blocks,
                              args.calls, load)
                wall = [row[f"{k}_ms"] for k in kinds]
                cpu = [row[f"{k}_cpu_ms"] for k in kinds]
                rows.append({"engine": engine, "shape": list(shape), "layout": layout,
                             "dtype": dtype, "op": op, "wall_ratio": max(wall) / min(wall),
                             "cpu_ratio": max(cpu) / min(cpu),
                             "mean_ms": dict(zip(kinds, wall, strict=True))})
                print(f"  {str(shape):18} {layout:4} {dtype:7} {op:9} "
                      + " ".join(f"{k} {w:.2f}" for k, w in zip(kinds, wall, strict=True))
                      + f"  -> {max(wall) / min(wall):.2f}x; cpu {max(cpu) / min(cpu):.2f}x",
                      flush=True)
        mine = [r for r in rows if r["engine"] == engine]
        print(f"  worst: {max(r['wall_ratio'] for r in mine):.2f}x wall, median over rows "
              f"{np.median([r['wall_ratio'] for r in mine]):.2f}x; cpu worst "
              f"{max(r['cpu_ratio'] for r in mine):.2f}x, median "
              f"{np.median([r['cpu_ratio'] for r in mine]):.2f}x")
    return rows


def cases(args: argparse.Namespace) -> list[tuple[tuple[int, ...], str, str]]:
    return [(shape, layout, dtype) for shape in SHAPES
            for layout in (["NCHW", "NHWC"] if len(shape) > 2 else ["NC"])
            for dtype in args.dtypes]


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summarize(rows: list[dict[str, Any]]) -> None:
    """Per engine and group of rows: geometric mean and minimum of torch/bncupy in wall time
    and in process CPU time (the per-core figure that a loaded machine disturbs least),
    naive/bncupy minimum; then the data-dependence spread, threads left spinning and CPU per
    wall second."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["threads"], r["op"], r["layout"], r["dtype"]), []).append(r)
    for engine in ENGINES:
        tag = "" if engine == "bncupy" else f"_{engine}"
        print(f"\nsummary: torch / {engine}, >= 1 where bncupy is faster (wall; process CPU time)")
        for key, rs in sorted(groups.items()):
            wall = [r[f"torch{tag}_ratio"] for r in rs if f"torch{tag}_ratio" in r]
            cpu = [r["torch_cpu_ms"] / r[f"{engine}_cpu_ms"] for r in rs if "torch_cpu_ms" in r]
            print(f"  threads {key[0]} {key[1]:9} {key[2]:4} {key[3]:7}  wall geomean "
                  f"{geomean(wall):5.2f} min {min(wall, default=math.nan):5.2f}   cpu geomean "
                  f"{geomean(cpu):5.2f} min {min(cpu, default=math.nan):5.2f}   naive/{engine} "
                  f"min {min(r[f'naive{tag}_ratio'] for r in rs):5.2f}")
        by_case: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for r in rows:
            by_case.setdefault((r["threads"], r["op"], tuple(r["shape"]), r["layout"],
                                r["dtype"]), []).append(r)
        for unit in (f"{engine}_ms", f"{engine}_cpu_ms"):
            worst = max(max(r[unit] for r in rs) / min(r[unit] for r in rs)
                        for rs in by_case.values())
            print(f"  slowest / fastest data distribution ({unit}), worst case: {worst:.2f}x")
        print(f"  highest {engine} CPU time / (wall time x threads): "
              f"{max(r[f'{engine}_cpu_ms'] / r[f'{engine}_ms'] / r['threads'] for r in rows):.2f}")
    for name in (*ENGINES, "torch"):
        if f"{name}_spin_ms" in rows[0]:
            spins = sorted(r[f"{name}_spin_ms"] for r in rows)
            print(f"  CPU burnt in the 50 ms after a block of {name} calls: at most "
                  f"{spins[-1]:.2f} ms, 99th percentile of rows {spins[int(0.99 * (len(spins) - 1))]:.2f} ms")


def _cpu_ratio(engine: str) -> Callable[[dict[str, Any]], float]:
    return lambda r: r["torch_cpu_ms"] / r[f"{engine}_cpu_ms"]


def compare(paths: list[str]) -> None:
    """Run-to-run spread of the torch/bncupy ratios (wall and CPU) between two saved runs."""
    runs = [json.load(open(p))["rows"] for p in paths]
    key = ("threads", "op", "layout", "dtype", "data")
    index = [{(tuple(r["shape"]), *(r[k] for k in key)): r for r in run} for run in runs]
    pairs = [(r0, index[1][k]) for k, r0 in index[0].items()
             if k in index[1] and "torch_ratio" in r0]
    for engine in ENGINES:
        tag = "" if engine == "bncupy" else f"_{engine}"
        for label, ratio in (("wall", lambda r, t=tag: r[f"torch{t}_ratio"]),
                             ("cpu", _cpu_ratio(engine))):
            diffs = sorted(abs(ratio(r1) / ratio(r0) - 1) for r0, r1 in pairs)
            print(f"{engine}: {len(diffs)} rows in both runs; |{label} ratio2 / ratio1 - 1|: "
                  f"median {np.median(diffs):.3f}, 90th percentile "
                  f"{diffs[int(0.9 * (len(diffs) - 1))]:.3f}, max {diffs[-1]:.3f}")


def readme(paths: list[str]) -> None:
    """The tables of docs/guide/performance.md: per engine, torch / bncupy in process CPU time
    per call, one thread, the median over the data distributions, ``run 1 · run 2`` per cell."""
    runs = [json.load(open(p))["rows"] for p in paths]
    cols = [(op, dtype) for dtype in ("float32", "float16") for op in OPS]
    names = {"fwd_train": "train", "fwd_eval": "eval", "bwd": "bwd"}
    for engine in ENGINES:
        print(f"\n{engine}\n\n| shape, layout | "
              + " | ".join(f"{names[op]} {dtype.replace('float', 'f')}" for op, dtype in cols)
              + " |\n|---|" + "---|" * len(cols))
        for shape in SHAPES:
            for layout in (["NCHW", "NHWC"] if len(shape) > 2 else ["NC"]):
                cells = []
                for op, dtype in cols:
                    per_run = []
                    for run in runs:
                        rs = [r for r in run if r["threads"] == 1 and tuple(r["shape"]) == shape
                              and r["layout"] == layout and r["dtype"] == dtype and r["op"] == op]
                        per_run.append(f"{np.median([_cpu_ratio(engine)(r) for r in rs]):.2f}")
                    cells.append(" · ".join(per_run))
                print(f"| {'×'.join(map(str, shape))} {layout} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--compare", nargs=2, metavar="RUN.json")
    parser.add_argument("--summary", metavar="RUN.json", help="summarize a saved run")
    parser.add_argument("--readme", nargs=2, metavar="RUN.json",
                        help="print the performance page's tables from two saved runs")
    parser.add_argument("--data-only", action="store_true",
                        help="only the data-dependence check (each engine alone, one thread)")
    args = parser.parse_args()
    if args.compare:
        compare(args.compare)
        return
    if args.readme:
        readme(args.readme)
        return
    if args.summary:
        summarize(json.load(open(args.summary))["rows"])
        return
    try:
        import torch
    except ImportError:
        torch = None
    engine = numpy_backend.engine().name
    numba = None
    if engine == "numba":
        import numba
    print(f"cores {os.cpu_count()}, numpy {np.__version__}, bncupy as installed: engine {engine}"
          f"{f' (numba {numba.__version__})' if numba else ''}, torch "
          f"{torch.__version__ if torch else 'absent'}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'thr':>3} {'shape':18} {'lay':4} {'dtype':7} {'data':9} {'op':9} {'bncupy':>7} "
          f"{'(cpu)':>7} {'nonumba':>7} {'(cpu)':>7} {'torch':>7} {'(cpu)':>7} {'naive':>7} "
          f"{'t/b':>5} {'+-':>5} {'t/nn':>5} {'n/b':>5}")
    rows: list[dict[str, Any]] = []
    load: list[float] = []
    start = time.perf_counter()
    for threads in [] if args.data_only else args.threads:
        os.environ["BNCUPY_NUM_THREADS"] = str(threads)
        if torch is not None:
            torch.set_num_threads(threads)
        for shape, layout, dtype in cases(args):
            for data in DATA:
                for op, fns in case_ops(shape, layout, np.dtype(dtype), data, torch).items():
                    row = {"threads": threads, "shape": list(shape), "layout": layout,
                           "dtype": dtype, "data": data, "op": op,
                           **measure(fns, args.blocks, args.calls, load)}
                    rows.append(row)
                    print(f"{threads:3} {str(shape):18} {layout:4} {dtype:7} {data:9} {op:9} "
                          f"{row['bncupy_ms']:7.2f} {row['bncupy_cpu_ms']:7.2f} "
                          f"{row['nonumba_ms']:7.2f} {row['nonumba_cpu_ms']:7.2f} "
                          f"{row.get('torch_ms', math.nan):7.2f} "
                          f"{row.get('torch_cpu_ms', math.nan):7.2f} {row['naive_ms']:7.2f} "
                          f"{row.get('torch_ratio', math.nan):5.2f} "
                          f"{row.get('torch_spread', math.nan):5.2f} "
                          f"{row.get('torch_nonumba_ratio', math.nan):5.2f} "
                          f"{row['naive_ratio']:5.2f}", flush=True)
    if rows:
        summarize(rows)
    data_rows = data_check(args, load)
    print(f"machine load while waiting to start a block: median {np.median(load):.2f} busy cores, "
          f"{100 * np.mean(np.asarray(load) >= 0.25):.0f}% of blocks started busy; "
          f"{time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engine": engine, "numba": numba.__version__ if numba else None,
                       "numpy": np.__version__,
                       "torch": torch.__version__ if torch else None,
                       "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows,
                       "data_dependence": data_rows}, f, indent=1)


if __name__ == "__main__":
    main()

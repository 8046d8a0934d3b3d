"""bncupy's own host time per call, with nothing behind the launch plan.

On a GPU the Python that runs before each launch is part of an op's speed: a ResNet-50 batch-norm
layer's kernels take 5-20 us, so a call that spends 50 us on the host loses whatever its kernels
do. This benchmark drives the CuPy backend's real launch plan (validation, geometry, argument
packing, allocation) on the tests' null runtime: kernels are not run and allocations never touch
memory, so what is timed is bncupy's Python and O(1) stand-ins for CuPy's allocator and launch.
The stand-ins are timed alone in the same blocks, and an op's count of each (through the seam)
times its cost is subtracted for bncupy's own time. Per op it also counts launches, allocations
and array operations.

A second table times the NumPy backend on tiny tensors against torch's CPU eager call, side by
side in the same run (torch optional).

    python3 benchmarks/host_overhead.py                  # tables (markdown) on stdout
    python3 benchmarks/host_overhead.py --bncupy DIR     # time another checkout's bncupy

Medians of ``--blocks`` timed blocks (alternating ops), per call, wall and process CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"


def _time(fns: dict[str, Callable[[], Any]], calls: int, blocks: int) -> dict[str, tuple]:
    """Median wall and CPU microseconds per call of each function, blocks interleaved."""
    for fn in fns.values():
        for _ in range(max(10, calls // 10)):
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fn()
            wall[name].append((time.perf_counter() - w0) / calls * 1e6)
            cpu[name].append((time.process_time() - c0) / calls * 1e6)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k]),
                min(wall[k]), max(wall[k])) for k in fns}


def _device_cases(bn: Any, xp: Any) -> dict[str, Callable[[], Any]]:
    """Every public op the launch budget covers, on device arrays of the null runtime."""
    rng = np.random.default_rng(0)

    def dev(shape: tuple[int, ...], dtype: str = "float32") -> Any:
        return xp.asarray(rng.standard_normal(shape).astype(dtype))

    cases: dict[str, Callable[[], Any]] = {}
    for layout, shape, axis in (("NCHW", (32, 64, 56, 56), 1), ("NHWC", (32, 56, 56, 64), -1)):
        x, dy, z = dev(shape), dev(shape), dev(shape)
        rm, rv, w, b = dev(64), dev(64) ** 2, dev(64), dev(64)
        _, m, s = bn.batch_norm_forward(x, rm, rv, w, b, True, axis=axis)
        cases[f"batch_norm train {layout}"] = lambda x=x, rm=rm, rv=rv, w=w, b=b, a=axis: \
            bn.batch_norm(x, rm, rv, w, b, True, axis=a)
        cases[f"batch_norm eval {layout}"] = lambda x=x, rm=rm, rv=rv, w=w, b=b, a=axis: \
            bn.batch_norm(x, rm, rv, w, b, False, axis=a)
        cases[f"batch_norm_backward {layout}"] = lambda dy=dy, x=x, w=w, m=m, s=s, a=axis: \
            bn.batch_norm_backward(dy, x, w, m, s, axis=a)
        layer = bn.BatchNorm2d(64, channels_last=axis == -1)
        fused = bn.BatchNorm2d(64, channels_last=axis == -1, activation="relu")
        cases[f"BatchNorm2d fwd+bwd {layout}"] = lambda layer=layer, x=x, dy=dy: \
            (layer(x), layer.backward(dy))
        cases[f"BatchNorm2d relu+residual fwd+bwd {layout}"] = \
            lambda layer=fused, x=x, dy=dy, z=z: (layer(x, residual=z), layer.backward(dy))
        gw, gb = dev(64), dev(64)
        _, gm, gs = bn.group_norm_forward(x, 8, gw, gb, axis=axis)
        cases[f"group_norm {layout}"] = lambda x=x, w=gw, b=gb, a=axis: \
            bn.group_norm(x, 8, w, b, axis=a)
        cases[f"group_norm_backward {layout}"] = lambda dy=dy, x=x, m=gm, s=gs, w=gw, a=axis: \
            bn.group_norm_backward(dy, x, 8, m, s, w, axis=a)
        _, im, istd = bn.instance_norm_forward(x, axis=axis)
        cases[f"instance_norm {layout}"] = lambda x=x, a=axis: bn.instance_norm(x, axis=a)
        cases[f"instance_norm_backward {layout}"] = lambda dy=dy, x=x, m=im, s=istd, a=axis: \
            bn.instance_norm_backward(dy, x, m, s, axis=a)
        gn = bn.GroupNorm(8, 64, channels_last=axis == -1)
        cases[f"GroupNorm fwd+bwd {layout}"] = lambda layer=gn, x=x, dy=dy: \
            (layer(x), layer.backward(dy))
        inst = bn.InstanceNorm2d(64, affine=True, channels_last=axis == -1)
        cases[f"InstanceNorm2d affine fwd+bwd {layout}"] = lambda layer=inst, x=x, dy=dy: \
            (layer(x), layer.backward(dy))
    x, dy = dev((8192, 1024)), dev((8192, 1024))
    w, b = dev(1024), dev(1024)
    _, m, s = bn.layer_norm_forward(x, 1024, w, b)
    cases["layer_norm (8192, 1024)"] = lambda: bn.layer_norm(x, 1024, w, b)
    cases["layer_norm_backward (8192, 1024)"] = lambda: bn.layer_norm_backward(dy, x, 1024, m,
                                                                               s, w)
    ln, rms = bn.LayerNorm(1024), bn.RMSNorm(1024)
    cases["LayerNorm fwd+bwd (8192, 1024)"] = lambda: (ln(x), ln.backward(dy))
    cases["RMSNorm fwd+bwd (8192, 1024)"] = lambda: (rms(x), rms.backward(dy))
    return cases


_ALLOCATE, _LAUNCH = "(stand-in) 2 allocations", "(stand-in) 2 launches"


def _stand_ins(xp: Any, runtime: Any) -> dict[str, Callable[[], Any]]:
    """The null runtime's stand-ins for CuPy's work, two of each per call: allocations (an
    output like an input and a per-channel vector, each freed when the next call replaces it,
    as an op's outputs are) and kernel launches (the argument tuple made beforehand: packing it
    is bncupy's work)."""
    x, held = xp.empty((32, 64, 56, 56), np.float32), [None, None]
    f32 = np.dtype(np.float32)

    def allocate() -> None:
        held[0] = xp.empty_like(x)
        held[1] = xp.empty(64, f32)

    kernel, args = runtime.kernel("float32", "stand-in"), tuple(range(16))

    def launch() -> None:
        kernel((1024,), (256,), args)
        kernel((1024,), (256,), args)

    return {_ALLOCATE: allocate, _LAUNCH: launch}


def device_table(bn: Any, calls: int, blocks: int) -> tuple[list[tuple], float, float]:
    """Rows of (op, wall us, cpu us, min, max, stand-ins' cpu us, launches, allocations,
    ops) on the null runtime, and the CPU us of one stand-in allocation and one launch."""
    from tests.emulated import NullRuntime, device

    device.POISON = False
    runtime = NullRuntime()
    previous = bn.backends.cupy.set_runtime(runtime)
    try:
        with bn.use_backend("cupy"):
            cases = _device_cases(bn, device)
            times = _time({**cases, **_stand_ins(device, runtime)}, calls, blocks)
            allocation, launch = times[_ALLOCATE][1] / 2, times[_LAUNCH][1] / 2
            rows = []
            for name, fn in cases.items():
                device.SEAM.reset()
                fn()
                seam = device.SEAM
                rows.append((name, *times[name],
                             seam.allocations * allocation + seam.launches * launch,
                             seam.launches, seam.allocations, seam.ops + seam.memsets))
            return rows, allocation, launch
    finally:
        bn.backends.cupy.set_runtime(previous)
        device.POISON = True


def numpy_table(bn: Any, calls: int, blocks: int) -> list[tuple]:
    """(op, bncupy us, torch us or None) on tiny CPU tensors, one thread each."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    w, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    rows = rng.standard_normal((4, 16)).astype(np.float32)
    lw, lb = np.ones(16, np.float32), np.zeros(16, np.float32)
    _, m, s = bn.batch_norm_forward(x, rm, rv, w, b, True)
    _, lm, ls = bn.layer_norm_forward(rows, 16, lw, lb)
    ours = {
        "batch_norm train (4, 3, 5, 5)": lambda: bn.batch_norm(x, rm, rv, w, b, True),
        "batch_norm eval (4, 3, 5, 5)": lambda: bn.batch_norm(x, rm, rv, w, b, False),
        "batch_norm_backward (4, 3, 5, 5)": lambda: bn.batch_norm_backward(x, x, w, m, s),
        "layer_norm (4, 16)": lambda: bn.layer_norm(rows, 16, lw, lb),
        "layer_norm_backward (4, 16)": lambda: bn.layer_norm_backward(rows, rows, 16, lm, ls,
                                                                      lw),
    }
    theirs: dict[str, Callable[[], Any]] = {}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(1)
        F = torch.nn.functional
        tx = torch.from_numpy(x).requires_grad_(True)
        trm, trv, tw, tb = (torch.from_numpy(a.copy()) for a in (rm, rv, w, b))
        tw.requires_grad_(True)
        tb.requires_grad_(True)
        ty = F.batch_norm(tx, trm, trv, tw, tb, True)
        tdy = torch.from_numpy(x)
        with torch.no_grad():
            theirs = {
                "batch_norm train (4, 3, 5, 5)": lambda: F.batch_norm(tx, trm, trv, tw, tb, True),
                "batch_norm eval (4, 3, 5, 5)": lambda: F.batch_norm(tx, trm, trv, tw, tb,
                                                                     False),
                "layer_norm (4, 16)": lambda: F.layer_norm(
                    torch.from_numpy(rows), (16,), torch.from_numpy(lw), torch.from_numpy(lb)),
            }
        theirs["batch_norm_backward (4, 3, 5, 5)"] = lambda: torch.autograd.grad(
            ty, (tx, tw, tb), tdy, retain_graph=True)
        tr, tlw, tlb = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (rows, lw, lb))
        tly = F.layer_norm(tr, (16,), tlw, tlb)
        tldy = torch.from_numpy(rows)
        theirs["layer_norm_backward (4, 16)"] = lambda: torch.autograd.grad(
            tly, (tr, tlw, tlb), tldy, retain_graph=True)
    fns = {**{("bncupy", k): f for k, f in ours.items()},
           **{("torch", k): f for k, f in theirs.items()}}
    times = _time(fns, calls, blocks)  # type: ignore[arg-type]
    return [(k, times[("bncupy", k)], times.get(("torch", k))) for k in ours]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bncupy", type=Path, help="directory holding the bncupy package to "
                        "time (default: this checkout)")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--blocks", type=int, default=7)
    args = parser.parse_args(argv)
    if os.environ.get("GLIBC_TUNABLES") != _TUNABLES:  # fresh outputs must not page-fault
        os.environ["GLIBC_TUNABLES"] = _TUNABLES
        os.execv(sys.executable, [sys.executable, *sys.argv])
    sys.path.insert(0, str(ROOT))
    if args.bncupy is not None:
        sys.path.insert(0, str(args.bncupy.resolve()))
    import bncupy as bn

    sys.path.insert(0, str(ROOT))  # this checkout's tests/emulated (null runtime) in any case
    print(f"bncupy from {Path(bn.__file__).parent}; {os.cpu_count()} CPUs; "
          f"{args.blocks} blocks x {args.calls} calls, medians")
    rows, allocation, launch = device_table(bn, args.calls, args.blocks)
    print(f"\nStand-ins for CuPy, CPU us each: allocation {allocation:.2f}, launch {launch:.2f}")
    print("\n| op (null runtime) | wall us | CPU us | wall min-max | stand-ins CPU us "
          "| bncupy's own CPU us | launches | allocations | array ops |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for name, wall, cpu, lo, hi, stand_ins, launches, allocs, ops in rows:
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {lo:.1f}-{hi:.1f} | {stand_ins:.1f} "
              f"| {cpu - stand_ins:.1f} | {launches} | {allocs} | {ops} |")
    print("\n| op (NumPy backend, tiny tensor) | bncupy wall us | torch CPU wall us | ratio |\n"
          "|---|---|---|---|")
    for name, ours, theirs in numpy_table(bn, args.calls, args.blocks):
        ratio = f"{ours[0] / theirs[0]:.2f}" if theirs else "-"
        torch_us = f"{theirs[0]:.1f}" if theirs else "-"
        print(f"| {name} | {ours[0]:.1f} | {torch_us} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

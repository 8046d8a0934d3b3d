"""The GPU benchmark behind ``bncupy bench`` and ``bncupy gpu-check``: rows of the GPU record.

Per (op, layout, dtype, shape) it times bncupy, torch's ``F.batch_norm`` with cuDNN and with
cuDNN off, and naive CuPy, side by side in one process, in three ways:

* ``*_us``: CUDA events around ``reps`` back-to-back calls, per call: what a training loop sees,
  the host's time included when it is the slower side;
* ``bncupy_device_us``: the same calls captured in a CUDA graph and replayed, per call: the
  kernels alone (the roofline fraction uses this time);
* ``*_host_us``: CPU wall time of one call with the GPU queue drained (median): the Python and
  launch cost a call adds.

The record format is fixed by the project's design notes (section 4). Timing is injectable
(``Timers``) so that the whole path runs on the CPU execution target in CI.
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _functional as F
from . import _norms as N
from . import _row_norms as R
from ._kernels import kernels_digest

RESNET50 = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28),
            (256, 14, 14), (1024, 14, 14), (512, 7, 7), (2048, 7, 7)]
# Tensors of at most 1 MB in float32, where a call is bound by launch and host cost.
SMALL = [(32, 64, 8, 8), (8, 128, 16, 16), (4, 256, 4, 4)]
# Bytes moved per element, in units of the tensor's size (design notes, section 4).
TRAFFIC = {"fwd_train": 3, "fwd_eval": 2, "bwd": 4}
REPO = Path(__file__).resolve().parent.parent


def _progress(items: list[Any], description: str) -> Iterable[Any]:
    for i, item in enumerate(items, 1):
        if i == 1 or i == len(items) or i % 10 == 0:
            print(f"[{i}/{len(items)}] {description}: {item}", file=sys.stderr, flush=True)
        yield item


@dataclass
class Timers:
    """How rows are timed (the CPU execution target passes stand-ins)."""

    throughput: Callable[[Any, Callable[[], Any], int], float]
    device: Callable[[Any, Callable[[], Any], int], float | None]
    host: Callable[[Any, Callable[[], Any], int], float]


def time_us(cupy: Any, fn: Callable[[], Any], reps: int, warmup: int = 3) -> float:
    """Per-call microseconds from CUDA events around ``reps`` back-to-back calls."""
    for _ in range(warmup):
        fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    cupy.cuda.get_current_stream().synchronize()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return float(cupy.cuda.get_elapsed_time(start, stop)) * 1e3 / reps


def graph_us(cupy: Any, fn: Callable[[], Any], reps: int) -> float | None:
    """Per-call microseconds of ``reps`` calls captured in one CUDA graph and replayed: the
    kernels without the host. None where the call cannot be captured."""
    stream = cupy.cuda.Stream(non_blocking=True)
    try:
        with stream:
            fn()  # the stream's workspace, before capturing
            stream.begin_capture()
            try:
                outputs = [fn() for _ in range(reps)]
            finally:
                graph = stream.end_capture()
            graph.launch()
            stream.synchronize()
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            graph.launch()
            stop.record()
            stop.synchronize()
    except Exception:  # noqa: BLE001 - any op or library that refuses capture: no figure
        return None
    del outputs
    return float(cupy.cuda.get_elapsed_time(start, stop)) * 1e3 / reps


def host_us(cupy: Any, fn: Callable[[], Any], reps: int) -> float:
    """Median CPU wall microseconds of one call with the GPU queue drained before it."""
    fn()
    times = []
    for _ in range(reps):
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    cupy.cuda.Device().synchronize()
    return float(np.median(times))


GPU_TIMERS = Timers(time_us, graph_us, host_us)


def copy_bandwidth_gbps(cupy: Any, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read plus bytes written."""
    src = cupy.ones(nbytes // 4, cupy.float32)
    dst = cupy.empty_like(src)
    us = time_us(cupy, lambda: dst.__setitem__(Ellipsis, src), reps=20)
    return 2 * nbytes / (us * 1e-6) / 1e9


def _torch_ops(torch: Any, shape: tuple[int, ...], dtype: str, layout: str,
               ) -> dict[str, Callable[[], Any]]:
    device = torch.device("cuda")
    x = torch.randn(shape, device=device, dtype=getattr(torch, dtype))
    if layout == "NHWC":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w = torch.ones(c, device=device, requires_grad=True)
    b = torch.zeros(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    xg = x.detach().requires_grad_(True)
    y = torch.nn.functional.batch_norm(xg, rm, rv, w, b, True)
    dy = torch.randn_like(y)
    fn = torch.nn.functional.batch_norm
    return {
        "fwd_train": lambda: fn(x, rm, rv, w, b, True),
        "fwd_eval": lambda: fn(x, rm, rv, w, b, False),
        "bwd": lambda: torch.autograd.grad(y, (xg, w, b), dy, retain_graph=True),
    }


def _ops(cupy: Any, shape: tuple[int, ...], dtype: str, layout: str) -> tuple[dict, dict]:
    """bncupy and naive-CuPy callables for one shape (NCHW shape given; NHWC laid out last)."""
    n, c, h, w = shape
    axis = 1 if layout == "NCHW" else -1
    dims = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
    x, dy = (_device_normal(cupy, dims, seed, dtype) for seed in (0, 1))
    weight, bias = cupy.ones(c, cupy.float32), cupy.zeros(c, cupy.float32)
    rm, rv = cupy.zeros(c, cupy.float32), cupy.ones(c, cupy.float32)
    _, mean, invstd = F.batch_norm_forward(x, None, None, weight, bias, True, axis=axis)
    red = tuple(i for i in range(4) if i != axis % 4)
    bshape = [1, 1, 1, 1]
    bshape[axis] = c

    def naive_train() -> Any:
        m = x.mean(axis=red, keepdims=True)
        v = x.var(axis=red, keepdims=True)
        return (x - m) / cupy.sqrt(v + 1e-5) * weight.reshape(bshape) + bias.reshape(bshape)

    def naive_eval() -> Any:
        return ((x - rm.reshape(bshape)) / cupy.sqrt(rv.reshape(bshape) + 1e-5)
                * weight.reshape(bshape) + bias.reshape(bshape))

    def naive_bwd() -> Any:
        xhat = (x - mean.reshape(bshape)) * invstd.reshape(bshape)
        g_mean = dy.mean(axis=red, keepdims=True)
        gx_mean = (dy * xhat).mean(axis=red, keepdims=True)
        return (dy - g_mean - xhat * gx_mean) * invstd.reshape(bshape)

    ours = {
        "fwd_train": lambda: F.batch_norm(x, rm, rv, weight, bias, True, axis=axis),
        "fwd_eval": lambda: F.batch_norm(x, rm, rv, weight, bias, False, axis=axis),
        "bwd": lambda: F.batch_norm_backward(dy, x, weight, mean, invstd, axis=axis),
    }
    naive = {"fwd_train": naive_train, "fwd_eval": naive_eval, "bwd": naive_bwd}
    return ours, naive


def _normal(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _device_normal(xp: Any, shape: tuple[int, ...], seed: int, dtype: str) -> Any:
    """Standard normal data of ``dtype`` made on the device where it has a generator (a host
    generator would take seconds on the benchmark's large tensors)."""
    random = getattr(xp, "random", None)
    if random is not None and hasattr(random, "default_rng"):
        values = random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        return xp.asarray(values).astype(dtype)  # a stand-in's generator may give host data
    return xp.asarray(_normal(shape, seed).astype(dtype))


def _free_pool(cupy: Any) -> None:
    pool = getattr(cupy, "get_default_memory_pool", None)
    if pool is not None:
        pool().free_all_blocks()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def bench_configs(batches: Iterable[int] = (32,), small: bool = True,
                  ) -> list[tuple[str, str, tuple[int, ...]]]:
    """(layout, dtype, NCHW shape) of the batch-norm rows: ResNet-50 at each batch, and the
    launch-bound small tensors."""
    shapes = [(n, *chw) for n in batches for chw in RESNET50] + (SMALL if small else [])
    return [(layout, dtype, shape) for layout in ("NCHW", "NHWC")
            for dtype in ("float32", "float16") for shape in shapes]


def bench_rows(cupy: Any, torch: Any, copy_gbps: float, configs: list, reps: int,
               timers: Timers = GPU_TIMERS) -> list[dict[str, Any]]:
    rows = []
    for layout, dtype, shape in _progress(configs, "bench"):
        ours, naive = _ops(cupy, shape, dtype, layout)
        theirs = _torch_ops(torch, shape, dtype, layout) if torch is not None else {}
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        for op in ("fwd_train", "fwd_eval", "bwd"):
            row: dict[str, Any] = {"op": op, "layout": layout, "dtype": dtype,
                                   "shape": list(shape)}
            row["bncupy_us"] = _round(timers.throughput(cupy, ours[op], reps))
            device = timers.device(cupy, ours[op], reps)
            row["bncupy_device_us"] = _round(device)
            row["bncupy_host_us"] = _round(timers.host(cupy, ours[op], reps))
            if theirs:
                torch.backends.cudnn.enabled = True
                row["torch_us"] = _round(timers.throughput(cupy, theirs[op], reps))
                row["torch_host_us"] = _round(timers.host(cupy, theirs[op], reps))
                torch.backends.cudnn.enabled = False
                row["torch_native_us"] = _round(timers.throughput(cupy, theirs[op], reps))
                torch.backends.cudnn.enabled = True
            else:
                row["torch_us"] = row["torch_host_us"] = row["torch_native_us"] = None
            row["cupy_naive_us"] = _round(timers.throughput(cupy, naive[op], reps))
            ideal_us = TRAFFIC[op] * nbytes / (copy_gbps * 1e9) * 1e6
            row["roofline_fraction"] = round(ideal_us / (device or row["bncupy_us"]), 4)
            rows.append(row)
        del ours, naive, theirs
        _free_pool(cupy)
    return rows


def _fused_row(cupy: Any, layout: str, shape: tuple[int, ...], reps: int,
               timers: Timers) -> dict[str, Any]:
    n, c, h, w = shape
    axis = 1 if layout == "NCHW" else -1
    dims = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
    x, z = (_device_normal(cupy, dims, seed, "float32") for seed in (0, 1))
    variants: dict[str, dict[str, Any]] = {
        "bn_us": {}, "bn_relu_us": {"activation": "relu"},
        "bn_add_relu_us": {"activation": "relu", "residual": z}}
    times = {name: timers.throughput(cupy, functools.partial(
        F.batch_norm, x, None, None, training=True, axis=axis, **kw), reps)
        for name, kw in variants.items()}
    return {"layout": layout, "dtype": "float32", "shape": list(shape),
            **{k: round(t, 2) for k, t in times.items()}}


def fused_rows(cupy: Any, reps: int, timers: Timers = GPU_TIMERS,
               shapes: Iterable[tuple[int, ...]] = ((32, 64, 56, 56), (32, 256, 56, 56),
                                                    (32, 1024, 14, 14))) -> list[dict]:
    """fwd_train with and without the fused ReLU (+ residual), on a few ResNet-50 shapes."""
    return [_fused_row(cupy, layout, shape, reps, timers) for layout in ("NCHW", "NHWC")
            for shape in shapes]


# LayerNorm over transformer hidden sizes; GroupNorm (32 groups) on ResNet and UNet shapes.
LAYER_NORM = [(8192, hidden) for hidden in (768, 1024, 4096, 8192)]
GROUP_NORM = [(32, 256, 56, 56), (32, 512, 28, 28), (16, 320, 64, 64), (8, 640, 32, 32),
              (8, 1280, 16, 16)]


def family_configs(quick: bool = False) -> list[tuple[str, str, tuple[int, ...]]]:
    """(norm, dtype, shape) of the LayerNorm and GroupNorm rows."""
    layer = LAYER_NORM[:2] if quick else LAYER_NORM
    group = GROUP_NORM[:2] if quick else GROUP_NORM
    return [(norm, dtype, shape) for dtype in ("float32", "float16")
            for norm, shapes in (("layer_norm", layer), ("group_norm", group))
            for shape in shapes]


def _family_ops(xp: Any, norm: str, shape: tuple[int, ...], dtype: str) -> dict[str, Callable]:
    """bncupy's forward and forward+backward for one LayerNorm/GroupNorm row."""
    x, dy = (_device_normal(xp, shape, seed, dtype) for seed in (0, 1))
    c = shape[-1] if norm == "layer_norm" else shape[1]
    w, b = xp.ones(c, np.float32), xp.zeros(c, np.float32)
    if norm == "layer_norm":
        def forward() -> Any:
            return R.layer_norm_forward(x, c, w, b)

        def both() -> Any:
            _, m, s = forward()
            return R.layer_norm_backward(dy, x, c, m, s, w)
    else:
        def forward() -> Any:
            return N.group_norm_forward(x, 32, w, b)

        def both() -> Any:
            _, m, s = forward()
            return N.group_norm_backward(dy, x, 32, m, s, w)
    return {"fwd": forward, "fwd_bwd": both}


def _family_torch(torch: Any, norm: str, shape: tuple[int, ...], dtype: str,
                  ) -> dict[str, Callable]:
    x = torch.randn(shape, device="cuda", dtype=getattr(torch, dtype), requires_grad=True)
    c = shape[-1] if norm == "layer_norm" else shape[1]
    w = torch.ones(c, device="cuda", requires_grad=True)
    b = torch.zeros(c, device="cuda", requires_grad=True)
    fn = {"layer_norm": lambda: torch.nn.functional.layer_norm(x, (c,), w.to(x.dtype),
                                                               b.to(x.dtype)),
          "group_norm": lambda: torch.nn.functional.group_norm(x, 32, w.to(x.dtype),
                                                               b.to(x.dtype))}[norm]
    dy = torch.randn(shape, device="cuda", dtype=x.dtype)

    def both() -> Any:
        return torch.autograd.grad(fn(), (x, w, b), dy)

    return {"fwd": fn, "fwd_bwd": both}


def family_rows(cupy: Any, torch: Any, reps: int, quick: bool = False,
                timer: Callable[[Any, Callable[[], Any], int], float] = time_us,
                host: Callable[[Any, Callable[[], Any], int], float] | None = None,
                ) -> list[dict[str, Any]]:
    """LayerNorm and GroupNorm forward and forward+backward against torch (cuDNN/ATen)."""
    rows = []
    for norm, dtype, shape in _progress(family_configs(quick), "family"):
        ours = _family_ops(cupy, norm, shape, dtype)
        theirs = _family_torch(torch, norm, shape, dtype) if torch is not None else {}
        for op in ("fwd", "fwd_bwd"):
            ours_us = timer(cupy, ours[op], reps)
            torch_us = timer(cupy, theirs[op], reps) if theirs else None
            rows.append({"norm": norm, "op": op, "dtype": dtype, "shape": list(shape),
                         "bncupy_us": round(ours_us, 2),
                         "torch_us": None if torch_us is None else round(torch_us, 2),
                         "bncupy_host_us": None if host is None else _round(
                             host(cupy, ours[op], reps)),
                         "torch_host_us": None if host is None or not theirs else _round(
                             host(cupy, theirs[op], reps))})
        _free_pool(cupy)
    return rows


# Transformer norms: (tokens, hidden) rows of RMSNorm and of the residual add + RMSNorm /
# LayerNorm (prenorm: y and h written), forward and backward (with the prenorm gradient).
TRANSFORMER = [(8192, hidden) for hidden in (2048, 4096, 8192)]
# bytes moved per element in units of the tensor's size: reads + writes of the op's tensors
# torch.compile takes tens of seconds per shape: one row carries its figure
COMPILED_ROW = ("add_rms", "bfloat16", (8192, 4096))
TRANSFORMER_TRAFFIC = {("rms", "fwd"): 2, ("rms", "bwd"): 3, ("add_rms", "fwd"): 4,
                       ("add_rms", "bwd"): 4, ("add_ln", "fwd"): 4, ("add_ln", "bwd"): 4}


def transformer_configs(quick: bool = False,
                        shapes: Iterable[tuple[int, int]] = TRANSFORMER,
                        ) -> list[tuple[str, str, tuple[int, int]]]:
    """(norm, dtype, (tokens, hidden)) of the transformer rows."""
    shapes = list(shapes)[1:2] if quick else list(shapes)
    return [(norm, dtype, shape) for dtype in ("bfloat16", "float16") for shape in shapes
            for norm in ("rms", "add_rms", "add_ln")]


def _transformer_ops(xp: Any, norm: str, shape: tuple[int, int], dtype: str,
                     ) -> dict[str, Callable[[], Any]]:
    tokens, hidden = shape
    x, r, dy, g = (_device_normal(xp, shape, seed, dtype) for seed in range(4))
    w, b = xp.ones(hidden, np.float32), xp.zeros(hidden, np.float32)
    if norm == "rms":
        _, rstd = R.rms_norm_forward(x, hidden, w)
        return {"fwd": lambda: R.rms_norm(x, hidden, w),
                "bwd": lambda: R.rms_norm_backward(dy, x, hidden, rstd, w)}
    if norm == "add_rms":
        _, rstd, h = R.rms_norm_forward(x, hidden, w, residual=r)
        return {"fwd": lambda: R.rms_norm(x, hidden, w, residual=r, prenorm=True),
                "bwd": lambda: R.rms_norm_backward(dy, h, hidden, rstd, w, grad_prenorm=g)}
    _, mean, rstd, h = R.layer_norm_forward(x, hidden, w, b, residual=r)
    return {"fwd": lambda: R.layer_norm(x, hidden, w, b, residual=r, prenorm=True),
            "bwd": lambda: R.layer_norm_backward(dy, h, hidden, mean, rstd, w, grad_prenorm=g)}


def _transformer_torch(torch: Any, norm: str, shape: tuple[int, int], dtype: str,
                       compile_: bool) -> dict[str, Callable[[], Any]]:
    """torch eager (and, with ``compile_``, torch.compile'd forward) of the same rows."""
    tokens, hidden = shape
    dt = getattr(torch, dtype)
    x, r = (torch.randn(shape, device="cuda", dtype=dt, requires_grad=True) for _ in range(2))
    w = torch.ones(hidden, device="cuda", dtype=dt, requires_grad=True)
    b = torch.zeros(hidden, device="cuda", dtype=dt, requires_grad=True)
    F_ = torch.nn.functional

    def forward(x: Any, r: Any) -> Any:
        if norm == "rms":
            return F_.rms_norm(x, (hidden,), w)
        h = x + r
        y = F_.rms_norm(h, (hidden,), w) if norm == "add_rms" else F_.layer_norm(
            h, (hidden,), w, b)
        return y, h

    out = forward(x, r)
    dy, g = torch.randn(shape, device="cuda", dtype=dt), torch.randn(shape, device="cuda",
                                                                      dtype=dt)
    outputs, grads = ((out,), (dy,)) if norm == "rms" else (out, (dy, g))
    inputs = (x, w) if norm == "rms" else (x, r, w)
    ops = {"fwd": lambda: forward(x, r),
           "bwd": lambda: torch.autograd.grad(outputs, inputs, grads, retain_graph=True)}
    if compile_:
        compiled = torch.compile(forward)
        with torch.no_grad():
            ops["fwd_compiled"] = lambda: compiled(x.detach(), r.detach())
    return ops


def transformer_rows(cupy: Any, torch: Any, copy_gbps: float, configs: list, reps: int,
                     timers: Timers = GPU_TIMERS, compile_: bool = False,
                     ) -> list[dict[str, Any]]:
    """RMSNorm and residual add + RMSNorm / LayerNorm rows against torch eager (and, with
    ``compile_``, torch.compile's forward on :data:`COMPILED_ROW`), with the roofline fraction
    of the device time."""
    rows = []
    for norm, dtype, shape in _progress(configs, "transformer"):
        ours = _transformer_ops(cupy, norm, shape, dtype)
        theirs = _transformer_torch(torch, norm, shape, dtype, compile_ and (
            norm, dtype, tuple(shape)) == COMPILED_ROW) if torch else {}
        nbytes = int(np.prod(shape)) * 2
        for op in ("fwd", "bwd"):
            row: dict[str, Any] = {"norm": norm, "op": op, "dtype": dtype,
                                   "shape": list(shape)}
            row["bncupy_us"] = _round(timers.throughput(cupy, ours[op], reps))
            device = timers.device(cupy, ours[op], reps)
            row["bncupy_device_us"] = _round(device)
            row["bncupy_host_us"] = _round(timers.host(cupy, ours[op], reps))
            row["torch_us"] = _round(timers.throughput(cupy, theirs[op], reps)) if theirs \
                else None
            compiled = theirs.get(f"{op}_compiled")
            row["torch_compile_us"] = None
            if compiled is not None:
                try:
                    row["torch_compile_us"] = _round(timers.throughput(cupy, compiled, reps))
                except Exception:  # noqa: BLE001 - torch.compile unavailable here: no figure
                    pass
            ideal_us = TRANSFORMER_TRAFFIC[norm, op] * nbytes / (copy_gbps * 1e9) * 1e6
            row["roofline_fraction"] = round(ideal_us / (device or row["bncupy_us"]), 4)
            rows.append(row)
        del ours, theirs
        _free_pool(cupy)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Geometric-mean speedups per (op, layout) and the roofline of large tensors."""
    out: dict[str, Any] = {}
    for op in TRAFFIC:
        for layout in ("NCHW", "NHWC"):
            sel = [r for r in rows if r["op"] == op and r["layout"] == layout]
            if not sel:
                continue
            key = f"{op}_{layout}"
            with_torch = [r for r in sel if r.get("torch_us")]
            if with_torch:
                out[f"{key}_vs_torch_geomean"] = round(float(np.exp(np.mean(
                    [np.log(r["torch_us"] / r["bncupy_us"]) for r in with_torch]))), 3)
            out[f"{key}_vs_naive_geomean"] = round(float(np.exp(np.mean(
                [np.log(r["cupy_naive_us"] / r["bncupy_us"]) for r in sel]))), 3)
            big = [r["roofline_fraction"] for r in sel
                   if np.prod(r["shape"]) * np.dtype(r["dtype"]).itemsize >= 64 << 20]
            if big:
                out[f"{key}_roofline_median_ge_64MB"] = round(float(np.median(big)), 3)
    return out


def versions(cupy: Any, torch: Any) -> dict[str, Any]:
    return {"python": platform.python_version(), "numpy": np.__version__,
            "cupy": cupy.__version__, "cuda": cupy.cuda.runtime.runtimeGetVersion(),
            "driver": cupy.cuda.runtime.driverGetVersion(),
            "torch": None if torch is None else torch.__version__}


def device_record(cupy: Any) -> dict[str, Any]:
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return {"name": name, "compute_capability": dev.compute_capability,
            "memory_bytes": int(props["totalGlobalMem"]),
            "sm_count": int(props["multiProcessorCount"])}


def commit() -> str:
    """The checkout's commit (``-dirty`` with uncommitted kernel or package changes);
    ``BNCUPY_COMMIT`` names it where the tree was copied without its git history."""
    named = os.environ.get("BNCUPY_COMMIT")
    if named:
        return named
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=REPO, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bncupy", "kernels"],
                               capture_output=True, text=True, cwd=REPO, check=True).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_table(rows: list[dict[str, Any]]) -> None:
    def cell(value: Any) -> str:
        return f"{value:9.1f}" if value is not None else f"{'-':>9}"

    print(f"{'op':9} {'layout':6} {'dtype':8} {'shape':22} {'bncupy':>9} {'device':>9} "
          f"{'host':>9} {'torch':>9} {'t.host':>9} {'native':>9} {'naive':>9} {'roof':>6}")
    for r in rows:
        print(f"{r['op']:9} {r['layout']:6} {r['dtype']:8} {str(tuple(r['shape'])):22} "
              f"{cell(r['bncupy_us'])} {cell(r['bncupy_device_us'])} "
              f"{cell(r['bncupy_host_us'])} {cell(r['torch_us'])} {cell(r['torch_host_us'])} "
              f"{cell(r['torch_native_us'])} {cell(r['cupy_naive_us'])} "
              f"{r['roofline_fraction']:6.2f}")


def cuda_torch() -> Any:
    """torch with cuDNN enabled when it can use this GPU, else None (torch columns are null)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.backends.cudnn.enabled = True
    return torch


def record_path(out_dir: Path, record: dict[str, Any]) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", record["device"]["name"]).strip("-").lower()
    return out_dir / f"gpu-{record['date'][:10]}-{slug}.json"


def base_record(cupy: Any, torch: Any) -> dict[str, Any]:
    """The record's identity fields: kernels digest, commit, date, device, versions."""
    return {"kernels_digest": kernels_digest(), "commit": commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": device_record(cupy), "versions": versions(cupy, torch)}


def main(out_dir: Path, quick: bool, run_tests: bool) -> int:
    """``bncupy bench``: the GPU check's bench phase alone, or with its suite phase."""
    from . import _gpu_check

    phases = ["env", *(["suite"] if run_tests else []), "bench"]
    return _gpu_check.main(out_dir, phases=phases, quick=quick)

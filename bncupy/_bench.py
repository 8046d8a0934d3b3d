"""``bncupy bench``: the GPU suite plus the ResNet-50 shape suite, written as a GPU record.

The record format is fixed by the project's design notes (section 4): kernels digest, commit, date,
device, versions, suite counts, copy bandwidth and one row per (op, layout, dtype, shape) with
bncupy, torch (cuDNN) and naive-CuPy medians from CUDA events, and the roofline fraction.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import platform
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import _functional as F
from ._kernels import kernels_digest

RESNET50 = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28),
            (256, 14, 14), (1024, 14, 14), (512, 7, 7), (2048, 7, 7)]
# Bytes moved per element, in units of the tensor's size (design notes, section 4).
TRAFFIC = {"fwd_train": 3, "fwd_eval": 2, "bwd": 4}
REPO = Path(__file__).resolve().parent.parent


def _progress(items: list[Any], description: str) -> Iterator[Any]:
    try:
        from rich.progress import track
    except ImportError:
        for i, item in enumerate(items, 1):
            print(f"[{i}/{len(items)}] {description}: {item}", file=sys.stderr, flush=True)
            yield item
        return
    yield from track(items, description=description)


def time_us(cupy: Any, fn: Callable[[], Any], reps: int, warmup: int = 3) -> float:
    """Median time of ``fn`` in microseconds from CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e3)
    return float(np.median(times))


def copy_bandwidth_gbps(cupy: Any, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read plus bytes written."""
    src = cupy.ones(nbytes // 4, cupy.float32)
    dst = cupy.empty_like(src)
    us = time_us(cupy, lambda: dst.__setitem__(Ellipsis, src), reps=20)
    return 2 * nbytes / (us * 1e-6) / 1e9


def run_suite(tests: Path) -> dict[str, Any]:
    """Run the test suite (GPU included) in a subprocess and count its outcomes."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests),
                   f"--junitxml={report}"]
        subprocess.run(command, check=False, cwd=tests.parent)
        root = ET.parse(report).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                                 "skipped")}
    return {"command": "python -m pytest -q tests", "passed": total["tests"] - total["failures"]
            - total["errors"] - total["skipped"], "failed": total["failures"] + total["errors"],
            "skipped": total["skipped"]}


def _torch_ops(torch: Any, shape: tuple[int, ...], dtype: str, layout: str) -> dict[str, Callable]:
    device = torch.device("cuda")
    tdtype = getattr(torch, dtype)
    x = torch.randn(shape, device=device, dtype=tdtype)
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
    x = cupy.random.default_rng(0).standard_normal(dims, dtype=cupy.float32).astype(dtype)
    dy = cupy.random.default_rng(1).standard_normal(dims, dtype=cupy.float32).astype(dtype)
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


def bench_rows(cupy: Any, torch: Any, copy_gbps: float, batches: Iterable[int], reps: int,
               ) -> list[dict[str, Any]]:
    configs = [(layout, dtype, (n, *chw)) for layout in ("NCHW", "NHWC")
               for dtype in ("float32", "float16") for n in batches for chw in RESNET50]
    rows = []
    for layout, dtype, shape in _progress(configs, "bench"):
        ours, naive = _ops(cupy, shape, dtype, layout)
        theirs = _torch_ops(torch, shape, dtype, layout) if torch is not None else {}
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        for op in ("fwd_train", "fwd_eval", "bwd"):
            ours_us = time_us(cupy, ours[op], reps)
            torch_us = time_us(cupy, theirs[op], reps) if theirs else None
            naive_us = time_us(cupy, naive[op], reps)
            ideal_us = TRAFFIC[op] * nbytes / (copy_gbps * 1e9) * 1e6
            rows.append({"op": op, "layout": layout, "dtype": dtype, "shape": list(shape),
                         "bncupy_us": round(ours_us, 2),
                         "torch_us": None if torch_us is None else round(torch_us, 2),
                         "cupy_naive_us": round(naive_us, 2),
                         "roofline_fraction": round(ideal_us / ours_us, 4)})
        del ours, naive, theirs
        cupy.get_default_memory_pool().free_all_blocks()
    return rows


def _fused_row(cupy: Any, layout: str, shape: tuple[int, ...], reps: int) -> dict[str, Any]:
    n, c, h, w = shape
    axis = 1 if layout == "NCHW" else -1
    dims = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
    x = cupy.random.default_rng(0).standard_normal(dims, dtype=cupy.float32)
    z = cupy.random.default_rng(1).standard_normal(dims, dtype=cupy.float32)
    variants: dict[str, dict[str, Any]] = {
        "bn_us": {}, "bn_relu_us": {"activation": "relu"},
        "bn_add_relu_us": {"activation": "relu", "residual": z}}
    times = {name: time_us(cupy, functools.partial(F.batch_norm, x, None, None, training=True,
                                                   axis=axis, **kw), reps)
             for name, kw in variants.items()}
    return {"layout": layout, "dtype": "float32", "shape": list(shape),
            **{k: round(t, 2) for k, t in times.items()}}


def fused_rows(cupy: Any, reps: int) -> list[dict[str, Any]]:
    """fwd_train with and without the fused ReLU (+ residual), on a few ResNet-50 shapes."""
    return [_fused_row(cupy, layout, shape, reps) for layout in ("NCHW", "NHWC")
            for shape in [(32, 64, 56, 56), (32, 256, 56, 56), (32, 1024, 14, 14)]]


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
    from . import _norms as N

    x = xp.asarray(np.random.default_rng(0).standard_normal(shape).astype(dtype))
    dy = xp.asarray(np.random.default_rng(1).standard_normal(shape).astype(dtype))
    c = shape[-1] if norm == "layer_norm" else shape[1]
    w, b = xp.ones(c, np.float32), xp.zeros(c, np.float32)
    if norm == "layer_norm":
        def forward() -> Any:
            return N.layer_norm_forward(x, c, w, b)

        def both() -> Any:
            _, m, s = forward()
            return N.layer_norm_backward(dy, x, c, m, s, w)
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
                         "torch_us": None if torch_us is None else round(torch_us, 2)})
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
            with_torch = [r for r in sel if r["torch_us"]]
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


def _versions(cupy: Any, torch: Any) -> dict[str, Any]:
    return {"python": platform.python_version(), "numpy": np.__version__,
            "cupy": cupy.__version__, "cuda": cupy.cuda.runtime.runtimeGetVersion(),
            "torch": None if torch is None else torch.__version__}


def _device(cupy: Any) -> dict[str, Any]:
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return {"name": name, "compute_capability": dev.compute_capability,
            "memory_bytes": int(props["totalGlobalMem"])}


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=REPO, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bncupy", "kernels"],
                               capture_output=True, text=True, cwd=REPO, check=True).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'op':9} {'layout':6} {'dtype':8} {'shape':22} {'bncupy':>9} {'torch':>9} " \
           f"{'naive':>9} {'roof':>6}"
    print(head)
    for r in rows:
        torch_us = f"{r['torch_us']:9.1f}" if r["torch_us"] else f"{'-':>9}"
        print(f"{r['op']:9} {r['layout']:6} {r['dtype']:8} {str(tuple(r['shape'])):22} "
              f"{r['bncupy_us']:9.1f} {torch_us} {r['cupy_naive_us']:9.1f} "
              f"{r['roofline_fraction']:6.2f}")


def _cuda_torch() -> Any:
    """torch with cuDNN enabled when it can use this GPU, else None (torch columns are null)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.backends.cudnn.enabled = True
    return torch


def main(out_dir: Path, quick: bool, run_tests: bool) -> int:
    from .backends import cupy as cupy_backend

    cupy = cupy_backend.require()
    torch = _cuda_torch()
    tests = REPO / "tests"
    suite = run_suite(tests) if run_tests and tests.is_dir() else None
    copy_gbps = copy_bandwidth_gbps(cupy)
    rows = bench_rows(cupy, torch, copy_gbps, (32,) if quick else (32, 256), 5 if quick else 20)
    print_table(rows)
    fused = fused_rows(cupy, 5 if quick else 20)
    family = family_rows(cupy, torch, 5 if quick else 20, quick)
    record: dict[str, Any] = {
        "kernels_digest": kernels_digest(),
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": _device(cupy),
        "versions": _versions(cupy, torch),
        "suite": suite,
        "copy_bandwidth_GBps": round(copy_gbps, 1),
        "summary": summarize(rows),
        "bench": rows,
        "fused": fused,
        "family": family,
    }
    print(json.dumps(record["summary"], indent=2))
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", record["device"]["name"]).strip("-").lower()
    path = out_dir / f"gpu-{record['date'][:10]}-{slug}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return 0 if suite is None or suite["failed"] == 0 else 1

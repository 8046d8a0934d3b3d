"""Call every public op of bncupy on the CuPy backend once per dtype, layout and path.

The driver of the GPU check's sanitizer phase (``compute-sanitizer --tool memcheck|racecheck|
initcheck|synccheck python benchmarks/gpu_driver.py``): small shapes, so it stays fast under the
sanitizers, chosen to reach the vector body and its scalar tails, several splits, the fused
variants and the row/group kernels. Each result is compared with the NumPy backend, so a wrong
answer fails the run as well as a memory error does.

``--emulated`` runs it on the CPU execution target of the test suite (CI's rehearsal).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bncupy as bn  # noqa: E402

# (N, C, H, W): a vector multiple, an odd spatial size (scalar tails), one sample.
SHAPES = [(4, 8, 16, 16), (3, 5, 7, 7), (1, 3, 5, 9)]
DTYPES = ["float16", "bfloat16", "float32", "float64"]
FAILURES: list[str] = []


def _close(name: str, got: Any, want: Any, dtype: str) -> None:
    tol = {"float16": 3e-2, "bfloat16": 6e-2, "float32": 1e-4, "float64": 1e-9}[dtype]
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    if got.shape != want.shape or not np.allclose(got, want, atol=tol * scale, rtol=tol):
        FAILURES.append(name)
        print(f"MISMATCH {name}: max error {np.abs(got - want).max(initial=0.0):.3g}", flush=True)


def _both(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], cp: Any,
          ) -> tuple[Any, Any]:
    """``fn`` on CuPy copies of the array arguments and on the NumPy originals, as NumPy."""
    def to_host(out: Any) -> Any:
        if isinstance(out, tuple):
            return tuple(to_host(o) for o in out)
        return cp.asnumpy(out) if isinstance(out, cp.ndarray) else out

    def on_device(a: Any) -> Any:
        return cp.asarray(a) if isinstance(a, np.ndarray) else a

    got = to_host(fn(*map(on_device, args), **{k: on_device(v) for k, v in kwargs.items()}))
    with bn.use_backend("numpy"):
        want = fn(*args, **kwargs)
    return got, want


def _compare(name: str, fn: Callable[..., Any], args: list[Any], cp: Any, dtype: str,
             **kwargs: Any) -> None:
    got, want = _both(fn, args, kwargs, cp)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if w is not None:
            _close(f"{name}[{i}]", g, w, dtype)


def batch_norm_ops(cp: Any, rng: np.random.Generator) -> None:
    for dtype in DTYPES:
        pdtype = "float64" if dtype == "float64" else "float32"
        for shape in SHAPES:
            for layout in ("NCHW", "NHWC"):
                n, c, h, w = shape
                axis = 1 if layout == "NCHW" else -1
                dims = shape if layout == "NCHW" else (n, h, w, c)
                x = (rng.standard_normal(dims) * 2 + 3).astype(dtype)
                dy = rng.standard_normal(dims).astype(dtype)
                z = rng.standard_normal(dims).astype(dtype)
                wt, b = rng.standard_normal(c).astype(pdtype), rng.standard_normal(c).astype(pdtype)
                rm, rv = np.zeros(c, pdtype), np.ones(c, pdtype)
                tag = f"{layout} {dtype} {dims}"
                _compare(f"bn fwd_train {tag}", bn.batch_norm_forward, [x, rm, rv, wt, b], cp, dtype,
                         training=True, axis=axis)
                _compare(f"bn fwd_eval {tag}", bn.batch_norm, [x, rm, rv, wt, b], cp, dtype,
                         training=False, axis=axis)
                _compare(f"bn fused relu+residual {tag}", bn.batch_norm, [x, None, None, wt, b], cp,
                         dtype, training=True, axis=axis, activation="relu", residual=z)
                _compare(f"bn eval relu+residual {tag}", bn.batch_norm, [x, rm, rv, wt, b], cp,
                         dtype, training=False, axis=axis, activation="relu", residual=z)
                mean, var = bn.moments(x.astype(np.float64), axis=axis)
                smean = mean.astype(pdtype)
                sinv = (1 / np.sqrt(var + 1e-5)).astype(pdtype)
                _compare(f"bn bwd {tag}", bn.batch_norm_backward, [dy, x, wt, smean, sinv], cp, dtype,
                         axis=axis)
                _compare(f"moments {tag}", bn.moments, [x], cp, dtype, axis=axis)
                _compare(f"renorm fwd {tag}", bn.batch_renorm_forward, [x, rm, rv + 0.5, wt, b], cp,
                         dtype, training=True, axis=axis)
                layer_step(cp, x, dy, z, axis, tag, dtype)


def layer_step(cp: Any, x: np.ndarray, dy: np.ndarray, z: np.ndarray, axis: int, tag: str,
               dtype: str) -> None:
    """A BatchNorm layer with a fused ReLU and residual: forward, backward, state."""
    c = x.shape[axis]
    cls = {4: bn.BatchNorm2d, 3: bn.BatchNorm1d, 5: bn.BatchNorm3d}[x.ndim]
    results = []
    for backend in ("cupy", "numpy"):
        with bn.use_backend(backend):
            xp = cp if backend == "cupy" else np
            layer = cls(c, activation="relu", channels_last=axis == -1)
            y = layer(xp.asarray(x), residual=xp.asarray(z))
            dx = layer.backward(xp.asarray(dy))
            results.append([cp.asnumpy(a) if backend == "cupy" else a for a in (
                y, dx, layer.grad_weight, layer.grad_bias, layer.grad_residual,
                layer.running_mean, layer.running_var)])
    for i, (g, w) in enumerate(zip(*results, strict=True)):
        _close(f"layer step {tag}[{i}]", g, w, dtype)


def family_ops(cp: Any, rng: np.random.Generator) -> None:
    for dtype in DTYPES:
        pdtype = "float64" if dtype == "float64" else "float32"
        for rows, hidden in [(6, 64), (5, 37), (3, 1000), (2, 70001)]:
            x = (rng.standard_normal((rows, hidden)) + 1).astype(dtype)
            dy = rng.standard_normal((rows, hidden)).astype(dtype)
            w, b = rng.standard_normal(hidden).astype(pdtype), rng.standard_normal(hidden).astype(pdtype)
            tag = f"{dtype} {(rows, hidden)}"
            _compare(f"layer_norm fwd {tag}", bn.layer_norm_forward, [x, hidden, w, b], cp, dtype)
            with bn.use_backend("numpy"):
                _, m, s = bn.layer_norm_forward(x, hidden, w, b)
            _compare(f"layer_norm bwd {tag}", bn.layer_norm_backward, [dy, x, hidden, m, s, w], cp,
                     dtype)
        for shape, groups in [((4, 8, 6, 6), 4), ((2, 6, 5, 7), 3), ((3, 32, 9), 32),
                              ((1, 4, 40000), 2)]:
            for axis in (1, -1):
                dims = shape if axis == 1 else (shape[0], *shape[2:], shape[1])
                x = (rng.standard_normal(dims) - 2).astype(dtype)
                dy = rng.standard_normal(dims).astype(dtype)
                c = shape[1]
                w, b = rng.standard_normal(c).astype(pdtype), rng.standard_normal(c).astype(pdtype)
                tag = f"{dtype} {dims} axis={axis}"
                _compare(f"group_norm fwd {tag}", bn.group_norm_forward, [x, groups, w, b], cp, dtype,
                         axis=axis)
                with bn.use_backend("numpy"):
                    _, m, s = bn.group_norm_forward(x, groups, w, b, axis=axis)
                _compare(f"group_norm bwd {tag}", bn.group_norm_backward, [dy, x, groups, m, s, w], cp,
                         dtype, axis=axis)
                _compare(f"instance_norm fwd {tag}", bn.instance_norm_forward, [x, None, None, w, b],
                         cp, dtype, axis=axis)
                rm, rv = np.zeros(c, pdtype), np.ones(c, pdtype)
                _compare(f"instance_norm running {tag}", lambda *a, **k: (
                    bn.instance_norm(*a, **k), a[1], a[2]), [x, rm, rv, w, b], cp, dtype,
                    axis=axis)


def transformer_ops(cp: Any, rng: np.random.Generator) -> None:
    """RMSNorm and the residual add + LayerNorm/RMSNorm, forward (prenorm) and backward (with
    the prenorm gradient), residual streams of the input's dtype and float32."""
    for dtype in DTYPES:
        pdtype = "float64" if dtype == "float64" else "float32"
        streams = [dtype, "float32"] if dtype in ("float16", "bfloat16") else [dtype]
        for rows, hidden in [(6, 64), (5, 37), (3, 1000), (2, 70001)]:
            x = (rng.standard_normal((rows, hidden)) + 1).astype(dtype)
            dy = rng.standard_normal((rows, hidden)).astype(dtype)
            w, b = rng.standard_normal(hidden).astype(pdtype), rng.standard_normal(hidden).astype(pdtype)
            tag = f"{dtype} {(rows, hidden)}"
            _compare(f"rms_norm fwd {tag}", bn.rms_norm_forward, [x, hidden, w], cp, dtype)
            with bn.use_backend("numpy"):
                _, s = bn.rms_norm_forward(x, hidden, w)
            _compare(f"rms_norm bwd {tag}", bn.rms_norm_backward, [dy, x, hidden, s, w], cp, dtype)
            for stream in streams:
                r = rng.standard_normal((rows, hidden)).astype(stream)
                g = rng.standard_normal((rows, hidden)).astype(stream)
                tag2 = f"{tag} residual {stream}"
                _compare(f"add+rms prenorm {tag2}", bn.rms_norm, [x, hidden, w], cp, dtype,
                         residual=r, prenorm=True)
                _compare(f"add+layer_norm {tag2}", bn.layer_norm, [x, hidden, w, b], cp, dtype,
                         residual=r)
                with bn.use_backend("numpy"):
                    _, m, s, h = bn.layer_norm_forward(x, hidden, w, b, residual=r)
                    _, s2, _ = bn.rms_norm_forward(x, hidden, w, residual=r)
                _compare(f"add+layer_norm bwd {tag2}", bn.layer_norm_backward,
                         [dy, h, hidden, m, s, w], cp, dtype, grad_prenorm=g)
                _compare(f"add+rms bwd {tag2}", bn.rms_norm_backward, [dy, h, hidden, s2, w], cp,
                         dtype, grad_prenorm=g)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulated", action="store_true", help="run on the CPU execution target")
    args = parser.parse_args(argv)
    if args.emulated:
        from tests import emulated

        emulated.install()
    from bncupy.backends import cupy as cupy_backend

    cp = cupy_backend.require()
    if not args.emulated:
        cp.cuda.set_allocator(None)  # every array its own cudaMalloc: the sanitizer sees its bounds
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with bn.use_backend("cupy"):
        batch_norm_ops(cp, rng)
        family_ops(cp, rng)
        transformer_ops(cp, rng)
    print(f"gpu_driver: {len(FAILURES)} mismatches, {time.perf_counter() - start:.1f} s", flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())

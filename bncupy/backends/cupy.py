"""CuPy backend: availability probing and the CUDA kernels' launch side.

``import cupy`` succeeds on machines without a GPU, so availability is probed separately and the
reason it fails is kept so that :class:`~bncupy.BackendUnavailableError` can say exactly what is
missing (CuPy, a device, or a new enough driver).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .._errors import BackendUnavailableError

name = "cupy"
_INSTALL_HINT = "pip install 'bncupy[cuda12]' or 'bncupy[cuda13]'"


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[str | None, BaseException | None]:
    try:
        import cupy
    except ImportError as exc:
        return f"CuPy is not installed ({_INSTALL_HINT})", exc
    runtime = cupy.cuda.runtime
    try:
        count = runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError, or a missing libcuda/libcudart
        try:
            driver, built = runtime.driverGetVersion(), runtime.runtimeGetVersion()
        except Exception:
            return f"no usable NVIDIA driver or CUDA runtime was found ({exc})", exc
        if driver == 0:
            return "no NVIDIA driver is installed (libcuda not found)", exc
        if driver < built:
            return (f"the NVIDIA driver is too old: it supports CUDA {_version(driver)}, but "
                    f"CuPy {cupy.__version__} needs CUDA {_version(built)}"), exc
        return f"no CUDA device is available ({exc})", exc
    if count == 0:
        return "no CUDA device is available (the driver reports 0 devices)", None
    return None, None


def unavailable_reason() -> str | None:
    """Why the CuPy backend cannot run here, or ``None`` when it can."""
    return _probe()[0]


def require() -> Any:
    """Return the ``cupy`` module, or raise :class:`BackendUnavailableError` saying what is missing."""
    reason, cause = _probe()
    if reason is not None:
        raise BackendUnavailableError(f"the cupy backend cannot run: {reason}") from cause
    import cupy

    return cupy


# ---------------------------------------------------------------------------------------------
# Kernels: names, compile options, per-device module cache, launches.

_CTYPES = {"float16": "bncupy::half_t", "float32": "float", "float64": "double"}
_ACC = {"float16": "float32", "float32": "float32", "float64": "float64"}
_INDEX = {"unsigned int": "uint32", "unsigned long long": "uint64"}
_THREADS = 256
_SOURCES = ("forward.cu", "backward.cu")


def vector_width(dtype_name: str) -> int:
    """Elements per 16-byte vector load for ``dtype_name``."""
    return 16 // {"float16": 2, "float32": 4, "float64": 8}[dtype_name]


def name_expressions() -> list[str]:
    """Every kernel specialisation the backend launches (also compiled by the NVRTC check)."""
    names = []
    for dtype, ctype in _CTYPES.items():
        for width in (1, vector_width(dtype)):
            for index in _INDEX:
                for kernel in ("forward_stats", "apply", "backward_reduce", "backward_apply"):
                    names.append(f"bncupy::{kernel}<{ctype}, {width}, {index}>")
    names += [f"bncupy::eval_coefficients<{a}>" for a in ("float", "double")]
    return names


def compile_options() -> tuple[str, ...]:
    from .._kernels import kernel_dir

    return ("-std=c++17", f"-I{kernel_dir()}")


def program_source() -> str:
    """One translation unit holding every kernel source."""
    return "\n".join(f'#include "{name}"' for name in _SOURCES) + "\n"


def __getattr__(attr: str) -> Any:
    if attr == "xp":  # the array module, imported on first use
        return require()
    raise AttributeError(attr)


@functools.cache
def _module(device_id: int) -> Any:
    cupy = require()
    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=program_source(), options=compile_options(),
                              name_expressions=name_expressions())


def _kernel(name: str) -> Any:
    cupy = require()
    return _module(cupy.cuda.Device().id).get_function(name)


@functools.cache
def _sm_count(device_id: int) -> int:
    cupy = require()
    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


_counters: dict[tuple[int, int], Any] = {}


def _counter_buffer(channels: int) -> Any:
    """Zeroed per-channel arrival counters for the current device and stream.

    The last block of each channel resets its counter, so one buffer serves every launch on a
    stream; separate streams get separate buffers, so concurrent launches never share one.
    """
    cupy = require()
    key = (cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr)
    buf = _counters.get(key)
    if buf is None or buf.size < channels:
        buf = cupy.zeros(max(channels, 1024), dtype=cupy.uint32)
        _counters[key] = buf
    return buf


def asarray(a: Any) -> Any:
    """A CuPy array for ``a`` (NumPy arrays are copied to the current device)."""
    return require().asarray(a)


def _view3(x: Any, axis: int) -> tuple[Any, int, int, int]:
    cupy = require()
    x = cupy.ascontiguousarray(x)
    rows = int(np.prod(x.shape[:axis], dtype=np.int64))
    inner = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
    return x, rows, x.shape[axis], inner


def _geometry(x: Any, inner: int, *others: Any) -> tuple[int, str, Any]:
    """Vector width, index C type and its NumPy scalar type for a launch over ``x``."""
    width = vector_width(x.dtype.name)
    aligned = all(a.data.ptr % 16 == 0 for a in (x, *others))
    if inner % width or not aligned:
        width = 1
    index = "unsigned int" if x.size < 2**31 else "unsigned long long"
    return width, index, getattr(np, _INDEX[index])


def _per_channel(value: Any, acc: str) -> Any:
    """A contiguous accumulator-typed copy of a per-channel vector (no copy when it is one)."""
    return None if value is None else require().ascontiguousarray(value, dtype=acc)


def _launch_apply(x: Any, rows: int, channels: int, inner: int, center: Any, scale: Any,
                  shift: Any) -> Any:
    cupy = require()
    y = cupy.empty_like(x)
    if x.size == 0:
        return y
    width, index, itype = _geometry(x, inner, y)
    total = x.size // width
    blocks = min(-(-total // _THREADS), _sm_count(cupy.cuda.Device().id) * 32)
    kernel = _kernel(f"bncupy::apply<{_CTYPES[x.dtype.name]}, {width}, {index}>")
    kernel((blocks,), (_THREADS,), (x, y, itype(total), itype(channels), itype(inner // width),
                                    center, scale, shift))
    return y


def _splits(channels: int, vectors: int, width: int) -> int:
    """Blocks per channel: enough for C * splits to fill the GPU ~8 blocks per SM deep, but
    at least two unrolled trips of work per thread."""
    unroll = 2 if width >= 8 else 4
    target = _sm_count(require().cuda.Device().id) * 8
    return max(1, min(-(-target // channels), vectors // (_THREADS * unroll * 2) or 1, 1024))


def _launch_stats(x: Any, rows: int, channels: int, inner: int, weight: Any, bias: Any,
                  running_mean: Any, running_var: Any, eps: float, momentum: float,
                  want_m2: bool = False) -> dict[str, Any]:
    """Run ``forward_stats``; returns its per-channel outputs by name."""
    cupy = require()
    acc = _ACC[x.dtype.name]
    scalar = getattr(np, acc)
    width, index, itype = _geometry(x, inner)
    splits = _splits(channels, rows * (inner // width), width)
    out = {name: cupy.empty(channels, acc)
           for name in ("save_mean", "save_invstd", "center", "scale", "shift")}
    out["mean64"] = cupy.empty(channels, cupy.float64)
    out["m2"] = cupy.empty(channels, acc) if want_m2 else None
    partials = cupy.empty((channels * splits, 3), acc)
    kernel = _kernel(f"bncupy::forward_stats<{_CTYPES[x.dtype.name]}, {width}, {index}>")
    kernel((channels * splits,), (_THREADS,), (
        x, itype(rows), itype(channels), itype(inner // width), np.int32(splits), partials,
        _counter_buffer(channels), weight, bias, running_mean, running_var, scalar(eps),
        np.float64(momentum), np.float64(rows * inner), out["save_mean"], out["save_invstd"],
        out["mean64"], out["center"], out["scale"], out["shift"], out["m2"]))
    return out


def stats(x: Any, axis: int) -> tuple[int, Any, Any]:
    """Per-channel ``(count, mean, m2)``; mean float64, m2 in the accumulator dtype."""
    x, rows, channels, inner = _view3(x, axis)
    count = rows * inner
    cupy = require()
    acc = _ACC[x.dtype.name]
    if count == 0:
        return 0, cupy.zeros(channels), cupy.zeros(channels, acc)
    out = _launch_stats(x, rows, channels, inner, None, None, None, None, 1.0, 0.0, True)
    return count, out["mean64"], out["m2"]


def normalize_train(x: Any, axis: int, weight: Any, bias: Any, eps: float, running_mean: Any,
                    running_var: Any, momentum: float) -> tuple[Any, Any, Any, Any]:
    """Two launches: statistics (whose last blocks also update the running statistics and fold
    the apply coefficients) and apply. Returns ``y``, float64 mean, save_mean, save_invstd."""
    require()
    x3, rows, channels, inner = _view3(x, axis)
    acc = _ACC[x.dtype.name]
    targets = [running_mean, running_var]
    running = [_per_channel(r, acc) for r in targets]
    out = _launch_stats(x3, rows, channels, inner, _per_channel(weight, acc),
                        _per_channel(bias, acc), running[0], running[1], eps, momentum)
    y = _launch_apply(x3, rows, channels, inner, out["center"], out["scale"], out["shift"])
    for target, value in zip(targets, running, strict=False):
        if target is not None and value is not target:
            target[...] = value  # a non-contiguous or differently typed running-stat array
    return y.reshape(x.shape), out["mean64"], out["save_mean"], out["save_invstd"]


def normalize_eval(x: Any, axis: int, running_mean: Any, running_var: Any, weight: Any,
                   bias: Any, eps: float) -> tuple[Any, Any, Any, Any]:
    """Coefficients from the running statistics (one tiny launch), then apply."""
    cupy = require()
    x3, rows, channels, inner = _view3(x, axis)
    acc = _ACC[x.dtype.name]
    coef = {name: cupy.empty(channels, acc) for name in ("invstd", "center", "scale", "shift")}
    ctype = "double" if acc == "float64" else "float"
    _kernel(f"bncupy::eval_coefficients<{ctype}>")(
        (-(-channels // _THREADS),), (_THREADS,),
        (np.int32(channels), _per_channel(running_mean, acc), _per_channel(running_var, acc),
         _per_channel(weight, acc), _per_channel(bias, acc), getattr(np, acc)(eps),
         coef["invstd"], coef["center"], coef["scale"], coef["shift"]))
    y = _launch_apply(x3, rows, channels, inner, coef["center"], coef["scale"], coef["shift"])
    return y.reshape(x.shape), coef["center"], coef["center"], coef["invstd"]


def backward(dy: Any, x: Any, axis: int, weight: Any, mean: Any, invstd: Any, training: bool,
             ) -> tuple[Any, Any, Any]:
    """Two launches: the deterministic reduction (which folds the dx coefficients and writes
    grad_weight/grad_bias) and the elementwise dx."""
    cupy = require()
    x3, rows, channels, inner = _view3(x, axis)
    dy3 = cupy.ascontiguousarray(dy)
    acc = _ACC[x.dtype.name]
    outs = {name: cupy.empty(channels, acc)
            for name in ("grad_weight", "grad_bias", "center", "a", "b", "c")}
    dx = cupy.empty_like(x3)
    if x.size == 0:
        outs["grad_weight"].fill(0)
        outs["grad_bias"].fill(0)
        return dx.reshape(x.shape), outs["grad_weight"], outs["grad_bias"]
    width, index, itype = _geometry(x3, inner, dy3, dx)
    ctype = _CTYPES[x.dtype.name]
    splits = _splits(channels, rows * (inner // width), width)
    mean64 = mean if mean.dtype == cupy.float64 else None
    mean_acc = None if mean64 is not None else _per_channel(mean, acc)
    partials = cupy.empty((channels * splits, 2), acc)
    _kernel(f"bncupy::backward_reduce<{ctype}, {width}, {index}>")(
        (channels * splits,), (_THREADS,),
        (dy3, x3, itype(rows), itype(channels), itype(inner // width), np.int32(splits), partials,
         _counter_buffer(channels), mean64, mean_acc, _per_channel(invstd, acc),
         _per_channel(weight, acc), np.float64(rows * inner), np.int32(bool(training)),
         outs["grad_weight"], outs["grad_bias"], outs["center"], outs["a"], outs["b"],
         outs["c"]))
    total = x3.size // width
    blocks = min(-(-total // _THREADS), _sm_count(cupy.cuda.Device().id) * 32)
    _kernel(f"bncupy::backward_apply<{ctype}, {width}, {index}>")(
        (blocks,), (_THREADS,),
        (dy3, x3, dx, itype(total), itype(channels), itype(inner // width), outs["center"],
         outs["a"], outs["b"], outs["c"]))
    return dx.reshape(x.shape), outs["grad_weight"], outs["grad_bias"]


def device_summary() -> str:
    """Name, compute capability and memory of the current device."""
    cupy = require()
    device = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(device.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return (f"{name} (device {device.id}, sm_{device.compute_capability}, "
            f"{props['totalGlobalMem'] / 2**30:.1f} GiB)")

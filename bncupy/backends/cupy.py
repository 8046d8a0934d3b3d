"""CuPy backend: availability probing and the CUDA kernels' launch side.

``import cupy`` succeeds on machines without a GPU, so availability is probed separately and the
reason it fails is kept so that :class:`~bncupy.BackendUnavailableError` can say exactly what is
missing (CuPy, a device, or a new enough driver).
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

import numpy as np

from .._errors import BackendUnavailableError
from ._common import forward_coefficients, merge_equal
from ._groups import GroupLayout

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


class CupyRuntime:
    """Where the backend's arrays live and its kernels run: CuPy on a CUDA device.

    The launch plan below (geometry, argument packing, allocation) talks to the device only
    through this object, so another runtime with the same methods (the tests' CPU execution of
    the same kernels) drives exactly the same code.
    """

    def unavailable_reason(self) -> str | None:
        return _probe()[0]

    def require(self) -> Any:
        reason, cause = _probe()
        if reason is not None:
            raise BackendUnavailableError(f"the cupy backend cannot run: {reason}") from cause
        import cupy

        return cupy

    @staticmethod
    def is_array(value: Any) -> bool:
        """A ``cupy.ndarray``, recognised by type so that no CuPy import (or GPU) is needed."""
        cls = type(value)
        return cls.__name__ == "ndarray" and cls.__module__.split(".")[0] == "cupy"

    def kernel(self, dtype: str, name: str) -> Any:
        return _module(self.require().cuda.Device().id, dtype).get_function(name)

    def sm_count(self) -> int:
        return _sm_count(self.require().cuda.Device().id)

    def device_id(self) -> int:
        return int(self.require().cuda.Device().id)

    def current_stream(self) -> Any:
        return self.require().cuda.get_current_stream()

    def describe(self) -> str:
        cupy = self.require()
        device = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(device.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return (f"{name} (device {device.id}, sm_{device.compute_capability}, "
                f"{props['totalGlobalMem'] / 2**30:.1f} GiB)")


_runtime: Any = CupyRuntime()


def runtime() -> Any:
    """The runtime the backend launches on (CuPy on a device unless replaced)."""
    return _runtime


def set_runtime(new: Any) -> Any:
    """Replace the runtime (tests run the kernels on the CPU this way); returns the previous."""
    global _runtime
    previous, _runtime = _runtime, new
    return previous


def unavailable_reason() -> str | None:
    """Why the CuPy backend cannot run here, or ``None`` when it can."""
    return _runtime.unavailable_reason()


def require() -> Any:
    """Return the array module, or raise :class:`BackendUnavailableError` saying what is missing."""
    return _runtime.require()


def is_array(value: Any) -> bool:
    """True for an array of this backend's kind."""
    return bool(_runtime.is_array(value))


# ---------------------------------------------------------------------------------------------
# Kernels: names, compile options, per-device module cache, launch geometry, launches.

_CTYPES = {"float16": "bncupy::half_t", "float32": "float", "float64": "double"}
_ACC = {"float16": "float32", "float32": "float32", "float64": "float64"}
_INDEX = {"unsigned int": np.uint32, "unsigned long long": np.uint64}
_INDEX64_FROM = 2**31  # elements from which kernels index with 64 bits
_THREADS = 256
SOURCES = ("forward.cu", "backward.cu")
_LAYOUT_KERNELS = ("forward_stats", "apply", "backward_reduce", "backward_apply", "relu_grad")
_ROW_KERNELS = ("row_stats", "row_grad_sums")
_GROUP_KERNELS = ("group_apply", "group_backward_apply")
_GROUP_LAYOUTS = {"rows": 0, "cf": 1, "cl": 2}
_ROWS_MAX_VECS = 8192  # longer groups are split over several blocks (forward_stats' geometry)


def vector_width(dtype_name: str) -> int:
    """Elements per 16-byte vector load for ``dtype_name``."""
    return 16 // np.dtype(dtype_name).itemsize


def name_expressions(dtypes: tuple[str, ...] = tuple(_CTYPES)) -> list[str]:
    """Every kernel specialisation the backend launches for ``dtypes`` (the NVRTC check compiles
    all of them)."""
    names = []
    for dtype in dtypes:
        ctype = _CTYPES[dtype]
        for width in (1, vector_width(dtype)):
            for index in _INDEX:
                for layout in ("false", "true"):
                    names += [f"bncupy::{kernel}<{ctype}, {width}, {index}, {layout}>"
                              for kernel in _LAYOUT_KERNELS]
                names += [f"bncupy::{kernel}<{ctype}, {width}, {index}>"
                          for kernel in _ROW_KERNELS]
                names += [f"bncupy::{kernel}<{ctype}, {width}, {index}, {layout}>"
                          for kernel in _GROUP_KERNELS for layout in _GROUP_LAYOUTS.values()]
        names.append(f"bncupy::eval_coefficients<{'double' if dtype == 'float64' else 'float'}>")
    return sorted(set(names))


def compile_options() -> tuple[str, ...]:
    from .._kernels import kernel_dir

    return ("-std=c++17", f"-I{kernel_dir()}")


def program_source() -> str:
    """One translation unit including every kernel source. CuPy's compile cache is keyed by
    this text, so it names the sources' digest: changed kernels are never served stale."""
    from .._kernels import kernels_digest

    includes = "".join(f'#include "{name}"\n' for name in SOURCES)
    return f"// bncupy kernels {kernels_digest()}\n{includes}"


def __getattr__(attr: str) -> Any:
    if attr == "xp":  # the array module, imported on first use
        return require()
    raise AttributeError(attr)


@functools.cache
def _module(device_id: int, dtype: str) -> Any:
    """The compiled kernels for one element dtype on one device (CuPy also caches on disk)."""
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=program_source(), options=compile_options(),
                              name_expressions=name_expressions((dtype,)))


@functools.cache
def _sm_count(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


_PER_THREAD_STREAM = 2  # cudaStreamPerThread: one handle, a separate stream in each host thread
_counters: dict[tuple, Any] = {}
_thread_counters = threading.local()


def _counter_buffer(size: int) -> Any:
    """Zeroed arrival counters private to the current device and stream.

    The last block of each channel (group) resets its counter, so one buffer serves every launch
    on a stream, whose kernels run one after another. Kernels on different streams may overlap,
    so each stream has its own buffer, and so has each host thread on CuPy's per-thread default
    stream (``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1``), whose one handle stands for a separate
    stream in every thread. A buffer is freed with its stream object, or with its thread.
    """
    stream = _runtime.current_stream()
    key = (_runtime, _runtime.device_id(), stream.ptr)
    if stream.ptr == _PER_THREAD_STREAM:
        if not hasattr(_thread_counters, "table"):
            _thread_counters.table = {}
        table: dict[tuple, Any] = _thread_counters.table
    else:
        table = _counters
        if key not in table:
            try:
                weakref.finalize(stream, _forget_counters, key)
            except TypeError:  # a stream type without weak references: kept for the process
                pass
    buf = table.get(key)
    if buf is None or buf.size < size:
        buf = require().zeros(max(size, 1024), dtype=np.uint32)
        table[key] = buf
    return buf


def _forget_counters(key: tuple) -> None:
    _counters.pop(key, None)


def asarray(a: Any) -> Any:
    """A CuPy array for ``a`` (NumPy arrays are copied to the current device)."""
    return require().asarray(a)


class _Geometry:
    """How one contiguous array is walked: layout, vector width, index type, grids."""

    def __init__(self, x: Any, axis: int, *others: Any) -> None:
        self.rows = int(np.prod(x.shape[:axis], dtype=np.int64))
        self.channels = int(x.shape[axis])
        inner = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
        # Channels-last kernels whenever channels are innermost: (N, C) too.
        self.cl = inner == 1
        extent = self.channels if self.cl else inner
        width = vector_width(x.dtype.name)
        aligned = all(a is None or a.data.ptr % 16 == 0 for a in (x, *others))
        self.width = width if extent % width == 0 and aligned else 1
        self.inner_vecs = extent // self.width
        self.index = "unsigned int" if x.size < _INDEX64_FROM else "unsigned long long"
        self.itype = _INDEX[self.index]
        self.total_vecs = x.size // self.width
        self.dtype = x.dtype.name
        self.acc = _ACC[self.dtype]
        sms = _runtime.sm_count()
        unroll = 2 if self.width >= 8 else 4
        if self.cl:
            self.lanes = min(32, 1 << max(0, (self.inner_vecs - 1).bit_length()))
            self.groups = -(-self.inner_vecs // self.lanes)
            trips = self.rows // (_THREADS // self.lanes * unroll * 2)
        else:
            self.lanes = 1
            self.groups = self.channels
            trips = self.rows * self.inner_vecs // (_THREADS * unroll * 2)
        # Blocks per channel (group): C * splits fills the GPU ~8 blocks per SM deep, but every
        # thread keeps at least two unrolled trips of work.
        self.splits = max(1, min(-(-sms * 8 // self.groups), trips or 1, 1024))
        self.apply_blocks = max(1, min(-(-self.total_vecs // _THREADS), sms * 32))

    def name(self, kernel: str) -> str:
        return (f"bncupy::{kernel}<{_CTYPES[self.dtype]}, {self.width}, {self.index}, "
                f"{'true' if self.cl else 'false'}>")

    def launch_reduce(self, kernel: str, arrays: tuple, rest: tuple) -> None:
        _runtime.kernel(self.dtype, self.name(kernel))(
            (self.groups * self.splits,), (_THREADS,),
            (*arrays, self.itype(self.rows), self.itype(self.channels),
             self.itype(self.inner_vecs), np.int32(self.splits), np.int32(self.lanes), *rest))

    def launch_elementwise(self, kernel: str, arrays: tuple, coefficients: tuple,
                           extra: tuple = ()) -> None:
        _runtime.kernel(self.dtype, self.name(kernel))(
            (self.apply_blocks,), (_THREADS,),
            (*arrays, self.itype(self.total_vecs), self.itype(self.channels),
             self.itype(self.inner_vecs), *coefficients, *extra))


def _like(a: Any, x: Any) -> Any:
    """``a`` (grad_output, residual) as a contiguous array of ``x``'s dtype, or None."""
    return None if a is None else require().ascontiguousarray(a, dtype=x.dtype)


def _per_channel(value: Any, acc: str) -> Any:
    """A contiguous accumulator-typed copy of a per-channel vector (no copy when it is one)."""
    return None if value is None else require().ascontiguousarray(value, dtype=acc)


def _apply(x: Any, geo: _Geometry, coef: tuple, residual: Any, relu: bool) -> Any:
    y = require().empty_like(x)
    if x.size:
        geo.launch_elementwise("apply", (x, y), coef, (residual, np.int32(relu)))
    return y


def _stats(x: Any, geo: _Geometry, weight: Any, bias: Any, running_mean: Any, running_var: Any,
           eps: float, momentum: float, want_m2: bool = False) -> dict[str, Any]:
    """Launch ``forward_stats``; returns its per-channel outputs by name."""
    cupy = require()
    c, acc = geo.channels, geo.acc
    out = {name: cupy.empty(c, acc)
           for name in ("save_mean", "save_invstd", "center", "scale", "shift")}
    out["mean64"] = cupy.empty(c, cupy.float64)
    out["m2"] = cupy.empty(c, acc) if want_m2 else None
    partials = cupy.empty((c * geo.splits, 3), acc)
    geo.launch_reduce("forward_stats", (x,), (
        partials, _counter_buffer(geo.groups), _per_channel(weight, acc), _per_channel(bias, acc),
        running_mean, running_var, getattr(np, acc)(eps), np.float64(momentum),
        np.float64(x.size // c), out["save_mean"], out["save_invstd"], out["mean64"],
        out["center"], out["scale"], out["shift"], out["m2"]))
    return out


def stats(x: Any, axis: int) -> tuple[int, Any, Any]:
    """Per-channel ``(count, mean, m2)``; mean float64, m2 in the accumulator dtype."""
    cupy = require()
    x = cupy.ascontiguousarray(x)
    c = x.shape[axis]
    count = x.size // c if c else 0
    if count == 0:
        return 0, cupy.zeros(c), cupy.zeros(c, _ACC[x.dtype.name])
    out = _stats(x, _Geometry(x, axis), None, None, None, None, 1.0, 0.0, want_m2=True)
    return count, out["mean64"], out["m2"]


def normalize_train(x: Any, axis: int, weight: Any, bias: Any, eps: float, running_mean: Any,
                    running_var: Any, momentum: float, residual: Any = None,
                    relu: bool = False) -> tuple[Any, Any, Any, Any, tuple]:
    """Two launches: statistics (whose last blocks also update the running statistics and fold
    the apply coefficients) and apply. Returns ``y``, float64 mean, save_mean, save_invstd and
    the apply coefficients (for a fused activation's backward)."""
    cupy = require()
    x = cupy.ascontiguousarray(x)
    residual = _like(residual, x)
    geo = _Geometry(x, axis, residual)
    targets = [running_mean, running_var]
    running = [_per_channel(r, geo.acc) for r in targets]
    out = _stats(x, geo, weight, bias, running[0], running[1], eps, momentum)
    coef = (out["center"], out["scale"], out["shift"])
    y = _apply(x, geo, coef, residual, relu)
    for target, value in zip(targets, running, strict=True):
        if target is not None and value is not target:
            target[...] = value  # a non-contiguous or differently typed running-stat array
    return y, out["mean64"], out["save_mean"], out["save_invstd"], coef


def normalize_eval(x: Any, axis: int, running_mean: Any, running_var: Any, weight: Any,
                   bias: Any, eps: float, residual: Any = None, relu: bool = False,
                   ) -> tuple[Any, Any, Any, Any, tuple]:
    """Coefficients from the running statistics (one tiny launch), then apply."""
    cupy = require()
    x = cupy.ascontiguousarray(x)
    residual = _like(residual, x)
    geo = _Geometry(x, axis, residual)
    acc, c = geo.acc, geo.channels
    invstd, center, scale, shift = (cupy.empty(c, acc) for _ in range(4))
    if c:
        ctype = "double" if acc == "float64" else "float"
        _runtime.kernel(geo.dtype, f"bncupy::eval_coefficients<{ctype}>")(
            (-(-c // _THREADS),), (_THREADS,),
            (np.int32(c), _per_channel(running_mean, acc), _per_channel(running_var, acc),
             _per_channel(weight, acc), _per_channel(bias, acc), getattr(np, acc)(eps), invstd,
             center, scale, shift))
    y = _apply(x, geo, (center, scale, shift), residual, relu)
    return y, center, center, invstd, (center, scale, shift)


def relu_grad(dy: Any, x: Any, axis: int, coef: tuple, residual: Any) -> Any:
    """``dy`` where the fused forward's output was positive, else 0 (one elementwise launch)."""
    cupy = require()
    x = cupy.ascontiguousarray(x)
    dy, residual = _like(dy, x), _like(residual, x)
    g = cupy.empty_like(x)
    if x.size:
        geo = _Geometry(x, axis, dy, g, residual)
        geo.launch_elementwise("relu_grad", (dy, x, residual, g), coef)
    return g


def _reduce_grad(dy: Any, x: Any, axis: int, weight: Any, mean: Any, invstd: Any,
                 training: bool) -> tuple[Any, Any, Any, tuple, _Geometry]:
    """The deterministic reduction; its last blocks fold the dx coefficients and write
    grad_weight/grad_bias. Returns those, dx's buffer, the coefficients and the geometry."""
    cupy = require()
    dy = _like(dy, x)
    dx = cupy.empty_like(x)
    geo = _Geometry(x, axis, dy, dx)
    acc, c = geo.acc, geo.channels
    grads = (cupy.zeros(c, acc), cupy.zeros(c, acc))
    coef = tuple(cupy.empty(c, acc) for _ in range(4))
    if x.size:
        mean64 = mean if mean.dtype == cupy.float64 else None
        partials = cupy.empty((c * geo.splits, 2), acc)
        geo.launch_reduce("backward_reduce", (dy, x), (
            partials, _counter_buffer(geo.groups), mean64,
            None if mean64 is not None else _per_channel(mean, acc), _per_channel(invstd, acc),
            _per_channel(weight, acc), np.float64(x.size // c), np.int32(bool(training)),
            *grads, *coef))
    return (*grads, dx, coef, geo)


def backward(dy: Any, x: Any, axis: int, weight: Any, mean: Any, invstd: Any, training: bool,
             ) -> tuple[Any, Any, Any]:
    """Two launches: the deterministic reduction and the elementwise dx."""
    x = require().ascontiguousarray(x)
    grad_weight, grad_bias, dx, coef, geo = _reduce_grad(dy, x, axis, weight, mean, invstd,
                                                         training)
    if x.size:
        geo.launch_elementwise("backward_apply", (_like(dy, x), x, dx), coef)
    return dx, grad_weight, grad_bias


def backward_sums(dy: Any, x: Any, axis: int, mean: Any, invstd: Any) -> tuple[Any, Any]:
    """Per-channel float64 ``sum(dy)`` and ``sum(dy * (x - mean))`` (one reduction launch)."""
    cupy = require()
    x = cupy.ascontiguousarray(x)
    ones = cupy.ones(x.shape[axis], _ACC[x.dtype.name])
    sum_dy_xmu, sum_dy, *_ = _reduce_grad(dy, x, axis, None, mean.astype(cupy.float64), ones,
                                          False)
    return sum_dy.astype(cupy.float64), sum_dy_xmu.astype(cupy.float64)


def backward_apply(dy: Any, x: Any, axis: int, center: Any, a: Any, b: Any, c: Any) -> Any:
    """``a * dy + b * (x - center) + c`` per channel (one elementwise launch)."""
    cupy = require()
    x = cupy.ascontiguousarray(x)
    dy = _like(dy, x)
    dx = cupy.empty_like(x)
    if x.size:
        geo = _Geometry(x, axis, dy, dx)
        geo.launch_elementwise("backward_apply", (dy, x, dx),
                               tuple(_per_channel(v, geo.acc) for v in (center, a, b, c)))
    return dx


def normalize_with(x: Any, axis: int, mean: Any, invstd: Any, weight: Any, bias: Any,
                   residual: Any = None, relu: bool = False) -> tuple[Any, tuple]:
    """Apply given (e.g. globally merged) statistics; returns ``y`` and the coefficients."""
    cupy = require()
    x = cupy.ascontiguousarray(x)
    residual = _like(residual, x)
    geo = _Geometry(x, axis, residual)
    coef = tuple(_per_channel(v, geo.acc)
                 for v in forward_coefficients(mean, invstd, weight, bias, x.dtype))
    return _apply(x, geo, coef, residual, relu), coef


def device_summary() -> str:
    """What the backend runs on: name, compute capability and memory of the current device."""
    return str(_runtime.describe())


# ---------------------------------------------------------------------------------------------
# Normalizations over groups (LayerNorm, GroupNorm, InstanceNorm; see _groups.GroupLayout).

class _GroupGeometry:
    """Vector width, index type and grid of the elementwise kernels over a group layout."""

    def __init__(self, x: Any, lay: GroupLayout, *others: Any) -> None:
        innermost = lay.s if lay.kind == "cf" else lay.c
        width = vector_width(x.dtype.name)
        aligned = all(a is None or a.data.ptr % 16 == 0 for a in (x, *others))
        self.width = width if innermost % width == 0 and aligned else 1
        self.dtype, self.acc = x.dtype.name, _ACC[x.dtype.name]
        self.index = "unsigned int" if x.size < _INDEX64_FROM else "unsigned long long"
        itype = _INDEX[self.index]
        total = x.size // self.width
        self.blocks = max(1, min(-(-total // _THREADS), _runtime.sm_count() * 32))
        self.shape_args = (itype(total), itype(lay.c), itype(innermost // self.width),
                           itype(max(1, lay.s * lay.c // self.width)), itype(lay.k))
        self.layout = _GROUP_LAYOUTS[lay.kind]

    def launch(self, kernel: str, arrays: tuple, vectors: tuple) -> None:
        name = (f"bncupy::{kernel}<{_CTYPES[self.dtype]}, {self.width}, {self.index}, "
                f"{self.layout}>")
        _runtime.kernel(self.dtype, name)((self.blocks,), (_THREADS,),
                                          (*arrays, *self.shape_args, *vectors))


def _row_launch(kernel: str, x: Any, rows: int, length: int, arrays: tuple, rest: tuple,
                *others: Any) -> None:
    """A reduce_rows kernel over ``rows`` contiguous rows of ``length`` values: a warp per short
    row up to a block per long one."""
    width = vector_width(x.dtype.name)
    aligned = all(a is None or a.data.ptr % 16 == 0 for a in (x, *others))
    width = width if length % width == 0 and aligned else 1
    vecs = length // width
    height = min(_THREADS, max(32, 1 << max(0, (vecs // 4 - 1).bit_length())))
    index = "unsigned int" if x.size < _INDEX64_FROM else "unsigned long long"
    itype = _INDEX[index]
    _runtime.kernel(x.dtype.name, f"bncupy::{kernel}<{_CTYPES[x.dtype.name]}, {width}, {index}>")(
        (-(-rows // (_THREADS // height)),), (_THREADS,),
        (*arrays, itype(rows), itype(vecs), np.int32(height), *rest))


def _contiguous_group_moments(x: Any, groups: int, size: int) -> tuple[Any, Any]:
    """float64 mean and accumulator-typed M2 of ``groups`` contiguous groups of ``size`` values:
    reduce_rows for groups up to _ROWS_MAX_VECS vectors, else forward_stats' split geometry."""
    cupy = require()
    if size // vector_width(x.dtype.name) > _ROWS_MAX_VECS:
        _, mean64, m2 = stats(x.reshape(1, groups, size), 1)
        return mean64, m2
    mean64, m2 = cupy.empty(groups, cupy.float64), cupy.empty(groups, _ACC[x.dtype.name])
    _row_launch("row_stats", x, groups, size, (x,), (mean64, m2))
    return mean64, m2


def _group_moments(x: Any, lay: GroupLayout) -> tuple[Any, Any]:
    """Per-group float64 mean and M2 of a contiguous array."""
    cupy = require()
    if lay.kind != "cl":
        mean64, m2 = _contiguous_group_moments(x, lay.groups, lay.size)
        return mean64, m2.astype(cupy.float64)
    per_group = lay.c // lay.k
    means, m2s = [], []
    for sample in x.reshape(lay.n, lay.s, lay.c):  # channels-last statistics of each sample
        _, mean, m2 = stats(sample, 1)
        _, gmean, gm2 = merge_equal(mean.reshape(per_group, lay.k).T,
                                    m2.astype(cupy.float64).reshape(per_group, lay.k).T, lay.s)
        means.append(gmean)
        m2s.append(gm2)
    return cupy.concatenate(means), cupy.concatenate(m2s)


def group_forward(x: Any, lay: GroupLayout, weight: Any, bias: Any, eps: float,
                  ) -> tuple[Any, Any, Any, Any]:
    """Statistics (one reduction launch, per sample for channels-last) and one apply launch;
    returns ``y`` and the per-group float64 mean, invstd and biased variance."""
    cupy = require()
    x = cupy.ascontiguousarray(x)
    y = cupy.empty_like(x)
    if x.size == 0:
        empty = cupy.full(lay.groups, np.nan)
        return y, empty, empty, empty
    mean64, m2 = _group_moments(x, lay)
    var = m2 / lay.size
    invstd = 1.0 / cupy.sqrt(var + eps)
    geo = _GroupGeometry(x, lay, y)
    center = mean64.astype(geo.acc)
    geo.launch("group_apply", (x, y), (
        center, (mean64 - center).astype(geo.acc), invstd.astype(geo.acc),
        _per_channel(weight, geo.acc), _per_channel(bias, geo.acc)))
    return y, mean64, invstd, var


def group_backward(dy: Any, x: Any, lay: GroupLayout, weight: Any, mean: Any, invstd: Any,
                   ) -> tuple[Any, Any, Any]:
    """``dx`` and float64 per-channel ``dweight``, ``dbias`` (per column for rows).

    Sums per group of ``w * dy`` and ``w * dy * (x - mean)``: LayerNorm rows in one reduce_rows
    launch; groups of channels from per-(sample, channel) sums (the batch-norm backward
    reduction over cells), folded per group on the host (O(n c)). Then one dx launch.
    """
    cupy = require()
    x = cupy.ascontiguousarray(x)
    dy = _like(dy, x)
    dx = cupy.empty_like(x)
    if x.size == 0:
        return dx, cupy.zeros(lay.c), cupy.zeros(lay.c)
    geo = _GroupGeometry(x, lay, dy, dx)
    acc = geo.acc
    mean, invstd = mean.astype(cupy.float64), invstd.astype(cupy.float64)
    center = mean.astype(acc)
    residual = mean - center
    w = None if weight is None else weight.astype(cupy.float64)
    if lay.kind == "rows":
        sum_wdy, sum_wdy_xc = cupy.empty(lay.n, acc), cupy.empty(lay.n, acc)
        _row_launch("row_grad_sums", x, lay.n, lay.c, (dy, x),
                    (center, _per_channel(weight, acc), sum_wdy, sum_wdy_xc), dy)
        s1 = sum_wdy.astype(cupy.float64)
        s2 = sum_wdy_xc - residual * s1
        xhat = cupy.empty_like(x)
        geo.launch("group_apply", (x, xhat), (center, residual.astype(acc), invstd.astype(acc),
                                               None, None))
        dbias, dweight = backward_sums(dy, xhat, 1, cupy.zeros(lay.c), None)
    else:
        cells = lay.n * lay.c
        cell_mean = cupy.repeat(mean.reshape(lay.n, -1), lay.k, axis=1)
        if lay.kind == "cf":
            sum_dy, sum_dy_xmu = backward_sums(dy.reshape(1, cells, lay.s),
                                               x.reshape(1, cells, lay.s), 1, cell_mean.ravel(),
                                               None)
        else:
            pairs = [backward_sums(d, v, 1, m, None) for d, v, m in zip(
                dy.reshape(lay.n, lay.s, lay.c), x.reshape(lay.n, lay.s, lay.c), cell_mean,
                strict=True)]
            sum_dy = cupy.concatenate([p[0] for p in pairs])
            sum_dy_xmu = cupy.concatenate([p[1] for p in pairs])
        sum_dy, sum_dy_xmu = sum_dy.reshape(lay.n, lay.c), sum_dy_xmu.reshape(lay.n, lay.c)
        scaled = (sum_dy, sum_dy_xmu) if w is None else (sum_dy * w, sum_dy_xmu * w)
        s1, s2 = (v.reshape(lay.n, -1, lay.k).sum(axis=2).ravel() for v in scaled)
        dbias = sum_dy.sum(axis=0)
        dweight = (sum_dy_xmu * cupy.repeat(invstd.reshape(lay.n, -1), lay.k, axis=1)).sum(axis=0)
    count = lay.size
    geo.launch("group_backward_apply", (dy, x, dx), (
        center, residual.astype(acc), _per_channel(weight, acc), invstd.astype(acc),
        (-invstd ** 3 * s2 / count).astype(acc), (-invstd * s1 / count).astype(acc)))
    return dx, dweight, dbias

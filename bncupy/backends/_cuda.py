"""Where the CuPy backend's kernels run: availability, the runtime seam, compiled modules, and
the per-stream workspace.

``import cupy`` succeeds on machines without a GPU, so availability is probed separately and the
reason it fails is kept so that :class:`~bncupy.BackendUnavailableError` can say exactly what is
missing (CuPy, a device, or a new enough driver).

The launch plan (:mod:`bncupy.backends.cupy`) reaches the device only through the runtime object
held here, so another runtime with the same methods (the tests' CPU execution of the same
kernels, or a null runtime that only counts) drives exactly the same code.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
import weakref
from typing import Any

import numpy as np

from .._errors import BackendUnavailableError

_INSTALL_HINT = ("from a checkout of bncupy: python3 -m pip install '.[cuda12]' or "
                 "'.[cuda13]'")

# A null pointer kernel argument. CuPy 13 passes None as a garbage address (CuPy 14 as NULL), so
# optional pointers always go in as this 8-byte zero.
NULL = np.uint64(0)


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
    """CuPy on a CUDA device: arrays, kernels, the SM count and the current stream."""

    def unavailable_reason(self) -> str | None:
        return _probe()[0]

    _cupy: Any = None  # the module, once require() found it usable (it stays so)

    def require(self) -> Any:
        if self._cupy is None:
            reason, cause = _probe()
            if reason is not None:
                raise BackendUnavailableError(f"the cupy backend cannot run: {reason}") from cause
            import cupy

            self._cupy = cupy
        return self._cupy

    @property
    def xp(self) -> Any:
        """The array module (for the launch plan, after the backend was resolved)."""
        return self._cupy or self.require()

    @staticmethod
    def is_array(value: Any) -> bool:
        """A ``cupy.ndarray``, recognised by type so that no CuPy import (or GPU) is needed."""
        cls = type(value)
        return cls.__name__ == "ndarray" and cls.__module__.split(".")[0] == "cupy"

    def kernel(self, dtype: str, name: str) -> Any:
        return _function(self.device_id(), dtype, name)

    def sm_count(self) -> int:
        return _sm_count(self.device_id())

    def shared_memory_optin(self) -> int:
        """Shared memory one block may take once its kernel opts in (sm_80: 163 KB, sm_90:
        227 KB)."""
        return _shared_optin(self.device_id())

    def device_id(self) -> int:
        return (self._cupy or self.require()).cuda.runtime.getDevice()

    def current_stream(self) -> Any:
        return (self._cupy or self.require()).cuda.get_current_stream()

    def external_stream(self, ptr: int, device_id: int) -> Any:
        """A CuPy stream object for another library's stream ``ptr`` (no copy, no new stream)."""
        return _external_stream(ptr, device_id)

    def is_capturing(self) -> bool:
        """Whether the current stream is being captured into a CUDA graph."""
        stream = self.current_stream()
        return bool(stream.ptr) and bool(stream.is_capturing())

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
    _bindings.clear()
    _shared_raised.clear()
    return previous


# ---------------------------------------------------------------------------------------------
# Kernel sources, names, and the per-device modules.

CTYPES = {"float16": "bncupy::half_t", "bfloat16": "bncupy::bf16_t", "float32": "float",
          "float64": "double"}
SOURCES = ("forward.cu", "backward.cu")
INDEX_TYPES = ("unsigned int", "unsigned long long")
_LAYOUT_KERNELS = ("forward_stats", "apply", "backward_reduce", "backward_apply")
_ROW_KERNELS = ("cell_stats", "row_forward", "row_backward", "column_grads",
                "cell_grad_planes", "cell_grad_cl", "row_norm_backward_shared")
_GROUP_KERNELS = ("group_apply", "group_backward_apply")
_ACC_KERNELS = ("group_merge", "group_grad_coefficients", "column_sums")
GROUP_LAYOUTS = {"rows": 0, "cf": 1, "cl": 2}


def vector_width(dtype_name: str) -> int:
    """Elements per 16-byte vector load for ``dtype_name``."""
    return 16 // (2 if dtype_name in ("float16", "bfloat16") else np.dtype(dtype_name).itemsize)


def sum_types(dtype_name: str) -> tuple[str, ...]:
    """C types of the residual stream ``row_norm`` adds ``dtype_name`` rows into: the rows' own,
    and float for 16-bit rows (a float32 residual stream)."""
    own = CTYPES[dtype_name]
    return (own, "float") if dtype_name in ("float16", "bfloat16") else (own,)


def name_expressions(dtypes: tuple[str, ...] = tuple(CTYPES)) -> list[str]:
    """Every kernel specialisation the backend launches for ``dtypes`` (the NVRTC check compiles
    all of them)."""
    names = []
    for dtype in dtypes:
        ctype = CTYPES[dtype]
        for width in (1, vector_width(dtype)):
            for index in INDEX_TYPES:
                head = f"{ctype}, {width}, {index}"
                names += [f"bncupy::{k}<{head}, {cl}>" for k in _LAYOUT_KERNELS
                          for cl in ("false", "true")]
                names += [f"bncupy::{k}<{head}>" for k in _ROW_KERNELS]
                names += [f"bncupy::row_norm<{ctype}, {h}, {width}, {index}>"
                          for h in sum_types(dtype)]
                names += [f"bncupy::row_norm_backward<{head}, {s}>" for s in ("false", "true")]
                names += [f"bncupy::{k}<{head}, {layout}>" for k in _GROUP_KERNELS
                          for layout in GROUP_LAYOUTS.values()]
        acc = "double" if dtype == "float64" else "float"
        names += [f"bncupy::{k}<{acc}>" for k in _ACC_KERNELS]
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


@functools.cache
def _module(device_id: int, dtype: str) -> Any:
    """The compiled kernels for one element dtype on one device (CuPy also caches on disk)."""
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=program_source(), options=compile_options(),
                              name_expressions=name_expressions((dtype,)))


@functools.cache
def _function(device_id: int, dtype: str, name: str) -> Any:
    return _module(device_id, dtype).get_function(name)


@functools.cache
def _sm_count(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


@functools.cache
def _shared_optin(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device_id).attributes["MaxSharedMemoryPerBlockOptin"])


SHARED_DEFAULT = 48 * 1024  # dynamic shared memory a launch may take without opting in
_shared_raised: set[tuple] = set()


def kernel_with_shared(dtype: str, name: str) -> Any:
    """Kernel ``name`` allowed more than 48 KB of dynamic shared memory: its limit
    (``max_dynamic_shared_size_bytes``, cudaFuncAttributeMaxDynamicSharedMemorySize) raised to
    all the device allows a block besides the kernel's static shared memory, once per kernel,
    device and runtime."""
    kernel = _runtime.kernel(dtype, name)
    key = (id(_runtime), _runtime.device_id(), name)
    if key not in _shared_raised:
        kernel.max_dynamic_shared_size_bytes = (_runtime.shared_memory_optin()
                                                - kernel.shared_size_bytes)
        _shared_raised.add(key)
    return kernel


@functools.lru_cache(maxsize=64)
def _external_stream(ptr: int, device_id: int) -> Any:
    """A CuPy handle on another library's stream. ``ExternalStream`` (deprecated in CuPy 14 for
    ``Stream.from_external``) because it never destroys the stream it wraps: a ``Stream`` made
    by ``from_external`` does when it is collected."""
    import cupy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr, device_id)


# ---------------------------------------------------------------------------------------------
# The workspace: arrival counters and scratch memory private to one (device, stream).

PER_THREAD_STREAM = 2  # cudaStreamPerThread: one handle, a separate stream in each host thread
_ALIGN = 256


class Workspace:
    """Zeroed arrival counters and scratch bytes for the kernels of one (device, stream).

    The last block of each channel (group) resets its counter, so the counters serve every launch
    on the stream, whose kernels run one after another. Buffers only grow, and an outgrown one is
    kept alive with the stream: work captured into a CUDA graph may still point at it.
    """

    def __init__(self) -> None:
        self.counters: Any = None
        self.scratch: Any = None
        self.generation = 0
        self._retired: list[Any] = []

    def ensure(self, counters: int, scratch: int) -> None:
        """At least ``counters`` counters and ``scratch`` bytes (allocated before any launch)."""
        xp = _runtime.require()
        if self.counters is None or self.counters.size < counters:
            fresh = xp.zeros(max(counters, 4096), dtype=np.uint32)
            self._retire(self.counters)
            self.counters = fresh
            self.generation += 1
        if self.scratch is None or self.scratch.size < scratch:
            fresh = xp.empty(max(scratch, 1 << 20, 2 * (0 if self.scratch is None
                                                       else self.scratch.size)), dtype=np.uint8)
            self._retire(self.scratch)
            self.scratch = fresh
            self.generation += 1

    def _retire(self, buffer: Any) -> None:
        if buffer is not None:
            self._retired.append(buffer)

    def carve(self, layout: tuple[tuple[Any, Any], ...]) -> tuple[Any, ...]:
        """Typed views of the scratch bytes, one per ``(dtype, count)`` (a flat view) or
        ``(dtype, shape)`` (a C-contiguous view of that shape), each 256-byte aligned."""
        views, offset = [], 0
        for dtype, size in layout:
            count = math.prod(size) if isinstance(size, tuple) else size
            nbytes = count * np.dtype(dtype).itemsize
            view = self.scratch[offset:offset + nbytes].view(dtype)
            views.append(view.reshape(size) if isinstance(size, tuple) else view)
            offset += -(-nbytes // _ALIGN) * _ALIGN
        return tuple(views)


def scratch_bytes(layout: tuple[tuple[Any, Any], ...]) -> int:
    """Bytes :meth:`Workspace.carve` needs for ``layout``."""
    return sum(-(-(math.prod(size) if isinstance(size, tuple) else size)
                 * np.dtype(dtype).itemsize // _ALIGN) * _ALIGN for dtype, size in layout)


_workspaces: dict[tuple, Workspace] = {}
_thread_workspaces = threading.local()
# (counters, scratch layout, workspace key, generation) -> the counters and carved views, so a
# call creates no views of its own.
_bindings: dict[tuple, tuple[Any, ...]] = {}


def workspace(stream: Any) -> tuple[tuple, Workspace]:
    """The workspace of the current device and ``stream`` and its key.

    Kernels on different streams may overlap, so each stream has its own, and so has each host
    thread on CuPy's per-thread default stream (``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1``), whose
    one handle stands for a separate stream in every thread. A workspace is freed with its stream
    object, or with its thread.
    """
    ptr = stream.ptr
    key: tuple = (id(_runtime), _runtime.device_id(), ptr)
    if ptr == PER_THREAD_STREAM:
        table = getattr(_thread_workspaces, "table", None)
        if table is None:
            table = _thread_workspaces.table = {}
        key = (*key, threading.get_ident())
    else:
        table = _workspaces
    found = table.get(key)
    if found is None:
        found = table[key] = Workspace()
        if table is _workspaces:
            try:
                weakref.finalize(stream, _forget, key)
            except TypeError:  # a stream type without weak references: kept for the process
                pass
    return key, found


def _forget(key: tuple) -> None:
    _workspaces.pop(key, None)
    for binding in [b for b in _bindings if b[2] == key]:
        del _bindings[binding]


def bind(stream: Any, counters: int, layout: tuple[tuple[str, int], ...]) -> tuple[Any, ...]:
    """``stream``'s arrival counters (at least ``counters``) and typed views of its scratch
    memory for ``layout``, cached: the workspace grows (before any launch) only when a launch
    plan needs more than it has."""
    ws_key, ws = workspace(stream)
    found = _bindings.get((counters, layout, ws_key, ws.generation))
    if found is None:
        ws.ensure(counters, scratch_bytes(layout))
        if len(_bindings) > 4096:
            _bindings.clear()
        found = (ws.counters, *ws.carve(layout))
        _bindings[(counters, layout, ws_key, ws.generation)] = found
    return found

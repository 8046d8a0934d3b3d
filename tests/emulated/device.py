"""Device arrays for the CPU execution target: host memory underneath, CuPy's rules on top.

Like ``cupy.ndarray``, an :class:`ndarray` here never turns into a NumPy array implicitly
(``numpy.asarray`` raises), refuses NumPy arrays as operands, kernel arguments or assigned values
(``a[...] = numpy_array`` raises CuPy's "non-scalar numpy.ndarray cannot be used for fill"), and
comes back to the host only through ``.get()`` / :func:`asnumpy`. Host code that mixes the two
works on NumPy and fails on a GPU; here it fails too.

Every allocation is 256-byte aligned (as CuPy's pool), fresh ``empty`` memory holds 0xFF bytes
(NaN in every float type), and canary bytes follow each allocation so a kernel writing past the
end is caught after its launch.

What crosses this seam is counted (:data:`SEAM`: allocations, array operations, memsets, host
synchronisations, launches and their streams), failures can be injected at the k-th allocation
or launch (:data:`FAULTS`), and a stream can be captured into a graph and replayed under CUDA's
capture rules (no host synchronisation while capturing; a replay must not use memory freed since
the capture).
"""

from __future__ import annotations

import math
import threading
import time
import types
import weakref
from collections.abc import Iterator
from operator import attrgetter
from typing import Any

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

_ALIGN = 256
_CANARY = np.frombuffer(bytes(range(0xA0, 0xC0)) * 2, np.uint8)  # 64 bytes


class OutOfMemoryError(MemoryError):
    """CuPy's ``cupy.cuda.memory.OutOfMemoryError``, as an injected fault raises it."""


class CUDADriverError(RuntimeError):
    """CuPy's ``cupy.cuda.driver.CUDADriverError``, as an injected launch fault raises it."""


class CaptureError(RuntimeError):
    """What CUDA refuses while a stream is being captured (or a replay that would be undefined)."""


class Seam:
    """Counts of what crossed the device seam since :meth:`reset`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.allocations = self.ops = self.memsets = self.syncs = self.launches = 0
        self.streams: list[int] = []  # the stream of every launch
        self.op_names: list[str] = []
        # per executed launch: (kernel, [(allocation, bytes read, bytes written, bytes of those
        # moved by accesses under 16 bytes), ...]) of the tensors it accessed through ld/st
        self.traffic: list[tuple[str, list]] = []
        # per executed launch: (kernel, 1/sqrt evaluations: rsqrtf and rsqrt calls)
        self.rsqrts: list[tuple[str, int]] = []

    def bytes(self, array: Any) -> tuple[int, int]:
        """Bytes read from and written to ``array``'s allocation by the launches counted."""
        read = written = 0
        for _, buffers in self.traffic:
            for alloc, r, w, _narrow in buffers:
                if alloc is array._alloc:
                    read, written = read + r, written + w
        return read, written

    def narrow_bytes(self, array: Any) -> int:
        """Bytes of ``array``'s allocation moved by loads and stores under 16 bytes."""
        return sum(n for _, buffers in self.traffic for alloc, _r, _w, n in buffers
                   if alloc is array._alloc)

    def op(self, name: str) -> None:
        self.ops += 1
        self.op_names.append(name)

    def sync(self) -> None:
        stream = get_current_stream()
        if stream.capture is not None:
            raise CaptureError("a host synchronisation while the stream is being captured "
                               "(cudaErrorStreamCaptureUnsupported)")
        self.syncs += 1


class Faults:
    """Raise at the k-th allocation or launch (1-based) after :meth:`arm`; disarmed by
    :meth:`disarm` or after it fires."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.left = 0

    def arm(self, kind: str, k: int) -> None:
        if kind not in ("allocation", "launch"):
            raise ValueError(f"kind must be 'allocation' or 'launch', got {kind!r}")
        self.kind, self.left = kind, k

    def disarm(self) -> None:
        self.kind, self.left = None, 0

    def tick(self, kind: str) -> None:
        if self.kind != kind:
            return
        self.left -= 1
        if self.left == 0:
            self.disarm()
            if kind == "allocation":
                raise OutOfMemoryError("out of memory (injected)")
            raise CUDADriverError("CUDA_ERROR_LAUNCH_FAILED: injected launch failure")


SEAM = Seam()
FAULTS = Faults()
_LIVE: weakref.WeakSet = weakref.WeakSet()  # every allocation, to resolve imported pointers
POISON = True  # fill fresh memory with 0xFF and check canaries (off: O(1) allocations)


class Allocation:
    """``nbytes`` of aligned host memory followed by canary bytes (with :data:`POISON`)."""

    __slots__ = ("buffer", "nbytes", "poisoned", "__weakref__")

    def __init__(self, nbytes: int) -> None:
        FAULTS.tick("allocation")
        SEAM.allocations += 1
        raw = np.empty(nbytes + _ALIGN + _CANARY.size, np.uint8)
        start = -raw.ctypes.data % _ALIGN
        self.buffer = raw[start:start + nbytes + _CANARY.size]
        self.nbytes = nbytes
        self.poisoned = POISON
        if POISON:
            self.buffer[nbytes:] = _CANARY
        _LIVE.add(self)

    def intact(self) -> bool:
        return not self.poisoned or bool((self.buffer[self.nbytes:] == _CANARY).all())


class _Bare(Allocation):
    """An allocation without alignment padding or canaries (see :data:`POISON`), from a pool of
    freed ones by shape and dtype, as CuPy's memory pool serves a freed block again: O(1), where
    a fresh host array over glibc's mmap threshold would cost two system calls per call."""

    __slots__ = ()
    pool: dict[tuple, list[np.ndarray]] = {}

    @classmethod
    def array(cls, shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray, Allocation]:
        FAULTS.tick("allocation")
        SEAM.allocations += 1
        alloc = cls.__new__(cls)
        free = cls.pool.get((shape, np.dtype(dtype)))
        host = free.pop() if free else np.empty(shape, dtype)
        alloc.buffer, alloc.nbytes, alloc.poisoned = host, host.nbytes, False
        return host, alloc

    def __del__(self) -> None:
        free = self.pool.setdefault((self.buffer.shape, self.buffer.dtype), [])
        if len(free) < 8:
            free.append(self.buffer)


class _Pointer:
    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


def _fresh(shape: Any, dtype: Any, fill: Any = None) -> ndarray:
    shape = tuple(int(s) for s in shape) if isinstance(shape, (tuple, list)) else (int(shape),)
    if not POISON and fill is None:  # the null runtime's O(1) allocation: memory never touched
        return ndarray(*_Bare.array(shape, dtype))
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    alloc = Allocation(nbytes)
    host = alloc.buffer[:nbytes].view(dtype).reshape(shape)
    if fill is None:
        if POISON:
            alloc.buffer[:nbytes] = 0xFF
    else:
        host[...] = fill
    return ndarray(host, alloc)


def _to_device(host: Any) -> ndarray:
    """A new device array holding a copy of ``host`` (an ndarray or NumPy scalar)."""
    host = np.asarray(host)
    return _fresh(host.shape, host.dtype, host)


def _unwrap(value: Any, where: str) -> Any:
    """``value`` with device arrays replaced by their host memory; NumPy arrays are refused as
    CuPy refuses them."""
    if isinstance(value, ndarray):
        return value._host
    if isinstance(value, np.ndarray):
        raise TypeError(f"Unsupported type {type(value)} in {where} (a NumPy array where CuPy "
                        f"needs a device array: move it with cupy.asarray first)")
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, where) for v in value)
    return value


def _wrap(result: Any, alloc: Allocation | None = None) -> Any:
    """Results of host computation as device values: views of ``alloc`` stay views, anything
    else becomes a new allocation; NumPy scalars become 0-d arrays as in CuPy."""
    if isinstance(result, np.ndarray):
        if alloc is not None and np.may_share_memory(result, alloc.buffer):
            return ndarray(result, alloc)
        return _to_device(result)
    if isinstance(result, np.generic):
        return _to_device(result)
    if isinstance(result, tuple):
        return tuple(_wrap(r, alloc) for r in result)
    if isinstance(result, list):
        return [_wrap(r, alloc) for r in result]
    return result


def _allocation_of(args: Any) -> Allocation | None:
    """The allocation of the first device array among ``args`` (nested in lists/tuples)."""
    for a in args:
        if isinstance(a, ndarray):
            return a._alloc
        if isinstance(a, (list, tuple)):
            found = _allocation_of(a)
            if found is not None:
                return found
    return None


def _call(fn: Any, args: tuple, kwargs: dict, where: str) -> Any:
    """``fn`` on the host memory of device arrays: a result that is a view of an argument's
    memory (transpose, reshape, moveaxis, broadcast_to, ...) stays a view of it; anything else
    is an operation making a new allocation (a kernel on a GPU)."""
    out = kwargs.get("out")
    result = fn(*_unwrap(args, where), **{k: _unwrap(v, where) for k, v in kwargs.items()})
    if out is not None:
        _operation(where)
        return out
    alloc = _allocation_of(args)
    if isinstance(result, np.ndarray) and alloc is not None and \
            np.may_share_memory(result, alloc.buffer):
        return ndarray(result, alloc)
    _operation(where)
    return _wrap(result)


def _operation(name: str) -> None:
    """An array operation: a kernel of CuPy's own on a GPU (not modelled while capturing)."""
    if get_current_stream().capture is not None:
        raise CaptureError(f"{name} while capturing: the CPU execution target models captured "
                           f"kernel launches only")
    SEAM.op(name)


# Methods that keep ``ndarray``'s meaning; views stay views of the same allocation.
_METHODS = frozenset({
    "all", "any", "argmax", "argmin", "clip", "conj", "cumsum", "diagonal", "dot", "max", "mean",
    "min", "nonzero", "prod", "ravel", "repeat", "reshape", "round", "squeeze", "std", "sum",
    "swapaxes", "take", "transpose", "var", "view", "flatten", "item", "tolist", "argsort",
    "sort", "fill",
})
_SYNCING = frozenset({"item", "tolist"})  # results on the host: a device synchronisation


class ndarray(NDArrayOperatorsMixin):  # noqa: N801 - CuPy's name
    """A device array of the CPU execution target (see the module docstring)."""

    # ``data`` is a slot filled on first read (by __getattr__): later reads are C-level, as
    # CuPy's attribute is, and an array whose pointer is never read never computes it.
    __slots__ = ("_host", "_alloc", "data")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, host: np.ndarray, alloc: Allocation) -> None:
        self._host = host
        self._alloc = alloc

    # -- CuPy's host/device boundary
    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use "
                        "`.get()` to construct a NumPy array explicitly.")

    def get(self, stream: Any = None, order: Any = "C", out: Any = None) -> np.ndarray:
        SEAM.sync()
        return np.array(self._host, order=order)

    def set(self, arr: Any, stream: Any = None) -> None:
        _operation("ndarray.set")
        self._host[...] = np.asarray(arr)

    def __setitem__(self, key: Any, value: Any) -> None:
        _operation("ndarray.__setitem__")
        if isinstance(value, np.ndarray):
            if value.shape != ():
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            value = value.item()
        elif isinstance(value, (list, tuple)):
            raise TypeError(f"Unsupported type {type(value)}")
        with np.errstate(over="ignore"):  # CuPy's copy casts beyond a type's range to inf quietly
            self._host[_unwrap(key, "an index")] = _unwrap(value, "an assignment")

    def __getitem__(self, key: Any) -> Any:
        result = self._host[_unwrap(key, "an index")]
        if not (isinstance(result, np.ndarray) and np.may_share_memory(result, self._alloc.buffer)):
            _operation("ndarray.__getitem__ (a gather)")
        return _wrap(result, self._alloc)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        return _call(getattr(ufunc, method), inputs, kwargs, f"numpy.{ufunc.__name__}")

    def __array_function__(self, func: Any, types: Any, args: tuple, kwargs: dict) -> Any:
        return _call(func, args, kwargs, f"numpy.{func.__name__}")

    # -- attributes: read in C, as CuPy's Cython properties are (a Python function per read
    # costs this target about 0.1 us, and the launch plan reads dozens per call)
    shape = property(attrgetter("_host.shape"))
    dtype = property(attrgetter("_host.dtype"))
    ndim = property(attrgetter("_host.ndim"))
    size = property(attrgetter("_host.size"))
    nbytes = property(attrgetter("_host.nbytes"))
    itemsize = property(attrgetter("_host.itemsize"))
    strides = property(attrgetter("_host.strides"))
    flags = property(attrgetter("_host.flags"))
    T = property(lambda self: ndarray(self._host.T, self._alloc))

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        """As CuPy's (version 3): the "device" pointer, shape and strides (None when
        C-contiguous); here the pointer is host memory."""
        host = self._host
        return {"shape": host.shape, "typestr": host.dtype.str, "version": 3,
                "data": (host.ctypes.data, False),
                "strides": None if host.flags.c_contiguous else host.strides}

    def astype(self, dtype: Any, order: Any = "K", copy: bool = True, **kw: Any) -> ndarray:
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        _operation("ndarray.astype")
        return _to_device(self._host.astype(dtype, order=order))

    def copy(self, order: Any = "C") -> ndarray:
        _operation("ndarray.copy")
        return _to_device(self._host.copy(order=order))

    def reshape(self, *shape: Any, order: str = "C") -> ndarray:
        if self._host.flags.c_contiguous and order == "C":  # always a view: the common case
            return ndarray(self._host.reshape(*shape), self._alloc)
        return self.__getattr__("reshape")(*shape, order=order)

    def transpose(self, *axes: Any) -> ndarray:
        return ndarray(self._host.transpose(*axes), self._alloc)

    def __getattr__(self, name: str) -> Any:
        if name == "data":
            pointer = self.data = _Pointer(self._host.ctypes.data)
            return pointer
        if name not in _METHODS:
            raise AttributeError(f"emulated device arrays do not model ndarray.{name}")
        method = getattr(self._host, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*_unwrap(args, name), **_unwrap(kwargs, name))
            if name in _SYNCING:
                SEAM.sync()
            elif not (isinstance(result, np.ndarray)
                      and np.may_share_memory(result, self._alloc.buffer)):
                _operation(f"ndarray.{name}")
            return _wrap(result, self._alloc)

        return call

    # -- Python protocols (CuPy allows these on size-1 arrays; each is a device sync)
    def __float__(self) -> float:
        SEAM.sync()
        return float(self._host)

    def __int__(self) -> int:
        SEAM.sync()
        return int(self._host)

    def __index__(self) -> int:
        SEAM.sync()
        return self._host.__index__()

    def __bool__(self) -> bool:
        SEAM.sync()
        return bool(self._host)

    def __len__(self) -> int:
        return len(self._host)

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"emulated.{np.array_repr(self._host)}"


# ---------------------------------------------------------------------------------------------
# The array module (what ``cupy`` is to CuPy code).

class _Stream:
    """A stream handle. Launches run to completion, so a stream keys per-stream state, and it
    can be captured into a :class:`Graph` (launches recorded, not run, until replayed)."""

    _next = 16

    def __init__(self, non_blocking: bool = False, ptr: int | None = None) -> None:
        if ptr is None:
            ptr, _Stream._next = _Stream._next, _Stream._next + 16
        self.ptr = ptr
        self.non_blocking = non_blocking
        self.capture: list | None = None

    def synchronize(self) -> None:
        SEAM.sync()

    def begin_capture(self) -> None:
        if self.ptr in (0, 2):
            raise CaptureError("the default stream cannot be captured")
        if self.capture is not None:
            raise CaptureError("the stream is already being captured")
        self.capture = []

    def is_capturing(self) -> bool:
        return self.capture is not None

    def end_capture(self) -> Graph:
        if self.capture is None:
            raise CaptureError("end_capture without begin_capture")
        graph, self.capture = Graph(self.capture), None
        return graph

    def __enter__(self) -> _Stream:
        _current.stack = (*_current.stack, self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _current.stack = _current.stack[:-1]


class Graph:
    """Captured launches, replayed in order by :meth:`launch` with the arguments they had.

    Memory allocated while capturing belongs to the graph as long as an array (a captured
    output, a workspace) keeps it alive; a replay that would touch memory freed since is an
    error, as it would read or write memory the pool has given to someone else.
    """

    def __init__(self, launches: list) -> None:
        self.launches = launches

    def launch(self, stream: Any = None) -> None:
        for replay, refs, name in self.launches:
            allocations = [(i, ref()) for i, ref in refs]
            dead = [i for i, alloc in allocations if alloc is None]
            if dead:
                raise CaptureError(f"graph replay of {name}: argument(s) {dead} point at memory "
                                   f"freed after the capture")
            replay(allocations)


class Event:
    """A CUDA event: launches run to completion, so it records the host clock."""

    def __init__(self) -> None:
        self.time = 0.0

    def record(self, stream: Any = None) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        SEAM.sync()


def get_elapsed_time(start: Event, stop: Event) -> float:
    """Milliseconds between two recorded events."""
    return (stop.time - start.time) * 1e3


def ExternalStream(ptr: int, device_id: int = 0) -> _Stream:  # noqa: N802 - CuPy's name
    """Another library's stream, by its handle."""
    return _Stream(ptr=ptr)


class _Current(threading.local):
    """This thread's ``with stream:`` stack. A class default, not ``getattr`` with a default:
    a missing thread-local attribute costs a failed lookup (0.6 us), where CuPy's
    ``get_current_stream`` is one C-level call."""

    stack: tuple[_Stream, ...] = ()


_current = _Current()
_NULL = _Stream(ptr=0)  # the legacy default stream
_PER_THREAD = _Stream(ptr=2)  # cudaStreamPerThread: one handle for every thread's own stream
per_thread_default_stream = False  # CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1


def get_current_stream() -> _Stream:
    """The innermost ``with stream:`` of this thread, else the default stream (CuPy's rule)."""
    stack = _current.stack
    if stack:
        return stack[-1]
    return _PER_THREAD if per_thread_default_stream else _NULL


class _Device:
    def __init__(self, device: int | None = None) -> None:
        self.id = 0 if device is None else int(device)

    def synchronize(self) -> None:
        SEAM.sync()

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


cuda = types.SimpleNamespace(Stream=_Stream, Device=_Device, ExternalStream=ExternalStream,
                             Event=Event, get_elapsed_time=get_elapsed_time,
                             get_current_stream=get_current_stream, is_available=lambda: True,
                             memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError),
                             driver=types.SimpleNamespace(CUDADriverError=CUDADriverError))


def asarray(a: Any, dtype: Any = None, order: Any = None) -> ndarray:
    if isinstance(a, ndarray):
        return a if dtype is None else a.astype(dtype, copy=False)
    if hasattr(a, "__cuda_array_interface__"):  # device memory of another library: no copy
        view = _import_interface(a.__cuda_array_interface__)
        return view if dtype is None else view.astype(dtype, copy=False)
    _operation("cupy.asarray (a host-to-device copy)")
    return _to_device(np.asarray(a, dtype=dtype))


def _import_interface(interface: dict) -> ndarray:
    """A view of the live allocation that ``interface`` (CUDA array interface) points into."""
    ptr = interface["data"][0]
    dtype = np.dtype(interface["typestr"])
    for alloc in _LIVE:
        base = alloc.buffer.ctypes.data
        if base <= ptr < base + max(alloc.nbytes, 1):
            host = np.ndarray(interface["shape"], dtype, buffer=alloc.buffer, offset=ptr - base,
                              strides=interface.get("strides"))
            return ndarray(host, alloc)
    raise ValueError("the CUDA array interface points at no emulated device allocation")


def array(a: Any, dtype: Any = None, copy: bool = True) -> ndarray:
    if isinstance(a, ndarray):
        return a.astype(a.dtype if dtype is None else dtype)
    _operation("cupy.array (a host-to-device copy)")
    return _to_device(np.array(a, dtype=dtype))


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    if not isinstance(a, ndarray):
        raise TypeError(f"Argument 'a' has incorrect type (expected cupy.ndarray, got "
                        f"{type(a).__name__})")
    if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    _operation("cupy.ascontiguousarray")
    return _to_device(np.ascontiguousarray(a._host, dtype=dtype))


def asnumpy(a: Any, stream: Any = None) -> np.ndarray:
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def empty(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return _fresh(shape, dtype)


def empty_like(a: ndarray, dtype: Any = None) -> ndarray:
    return _fresh(a.shape, a.dtype if dtype is None else dtype)


def zeros(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    """A fresh allocation set to 0 by a memset (not modelled while capturing)."""
    if get_current_stream().capture is not None:
        raise CaptureError("cupy.zeros (a memset) while capturing: the CPU execution target "
                           "models captured kernel launches only")
    SEAM.memsets += 1
    return _fresh(shape, dtype, 0)


def full(shape: Any, fill_value: Any, dtype: Any = None, order: str = "C") -> ndarray:
    _operation("cupy.full")
    return _fresh(shape, np.result_type(fill_value) if dtype is None else dtype, fill_value)


def ones(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return full(shape, 1, dtype)


def get_array_module(*args: Any) -> Any:
    import sys

    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


def __getattr__(name: str) -> Any:
    """Everything else is NumPy's, with CuPy's rules: device arrays in, device arrays out."""
    attr = getattr(np, name)
    if isinstance(attr, (type, np.dtype)) or not callable(attr):
        return attr  # dtypes, constants

    def call(*args: Any, **kwargs: Any) -> Any:
        return _call(attr, args, kwargs, f"cupy.{name}")

    call.__name__ = name
    return call

"""Device arrays for the CPU execution target: host memory underneath, CuPy's rules on top.

Like ``cupy.ndarray``, an :class:`ndarray` here never turns into a NumPy array implicitly
(``numpy.asarray`` raises), refuses NumPy arrays as operands, kernel arguments or assigned values
(``a[...] = numpy_array`` raises CuPy's "non-scalar numpy.ndarray cannot be used for fill"), and
comes back to the host only through ``.get()`` / :func:`asnumpy`. Host code that mixes the two
works on NumPy and fails on a GPU; here it fails too.

Every allocation is 256-byte aligned (as CuPy's pool), fresh ``empty`` memory holds 0xFF bytes
(NaN in every float type), and canary bytes follow each allocation so a kernel writing past the
end is caught after its launch.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

_ALIGN = 256
_CANARY = np.frombuffer(bytes(range(0xA0, 0xC0)) * 2, np.uint8)  # 64 bytes


class Allocation:
    """``nbytes`` of aligned host memory followed by canary bytes."""

    __slots__ = ("buffer", "nbytes")

    def __init__(self, nbytes: int) -> None:
        raw = np.empty(nbytes + _ALIGN + _CANARY.size, np.uint8)
        start = -raw.ctypes.data % _ALIGN
        self.buffer = raw[start:start + nbytes + _CANARY.size]
        self.buffer[nbytes:] = _CANARY
        self.nbytes = nbytes

    def intact(self) -> bool:
        return bool((self.buffer[self.nbytes:] == _CANARY).all())


class _Pointer:
    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


def _fresh(shape: Any, dtype: Any, fill: Any = None) -> ndarray:
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    alloc = Allocation(nbytes)
    host = alloc.buffer[:nbytes].view(dtype).reshape(shape)
    if fill is None:
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


def _call(fn: Any, args: tuple, kwargs: dict, where: str) -> Any:
    out = kwargs.get("out")
    result = fn(*_unwrap(args, where), **{k: _unwrap(v, where) for k, v in kwargs.items()})
    return out if out is not None else _wrap(result)


# Methods that keep ``ndarray``'s meaning; views stay views of the same allocation.
_METHODS = frozenset({
    "all", "any", "argmax", "argmin", "clip", "conj", "cumsum", "diagonal", "dot", "max", "mean",
    "min", "nonzero", "prod", "ravel", "repeat", "reshape", "round", "squeeze", "std", "sum",
    "swapaxes", "take", "transpose", "var", "view", "flatten", "item", "tolist", "argsort",
    "sort", "fill",
})


class ndarray(NDArrayOperatorsMixin):  # noqa: N801 - CuPy's name
    """A device array of the CPU execution target (see the module docstring)."""

    __slots__ = ("_host", "_alloc")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, host: np.ndarray, alloc: Allocation) -> None:
        self._host = host
        self._alloc = alloc

    # -- CuPy's host/device boundary
    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use "
                        "`.get()` to construct a NumPy array explicitly.")

    def get(self, stream: Any = None, order: str = "C", out: Any = None) -> np.ndarray:
        return np.array(self._host, order=order)

    def set(self, arr: Any, stream: Any = None) -> None:
        self._host[...] = np.asarray(arr)

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, np.ndarray):
            if value.shape != ():
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            value = value.item()
        elif isinstance(value, (list, tuple)):
            raise TypeError(f"Unsupported type {type(value)}")
        self._host[_unwrap(key, "an index")] = _unwrap(value, "an assignment")

    def __getitem__(self, key: Any) -> Any:
        return _wrap(self._host[_unwrap(key, "an index")], self._alloc)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        return _call(getattr(ufunc, method), inputs, kwargs, f"numpy.{ufunc.__name__}")

    def __array_function__(self, func: Any, types: Any, args: tuple, kwargs: dict) -> Any:
        return _call(func, args, kwargs, f"numpy.{func.__name__}")

    # -- attributes
    shape = property(lambda self: self._host.shape)
    dtype = property(lambda self: self._host.dtype)
    ndim = property(lambda self: self._host.ndim)
    size = property(lambda self: self._host.size)
    nbytes = property(lambda self: self._host.nbytes)
    itemsize = property(lambda self: self._host.itemsize)
    strides = property(lambda self: self._host.strides)
    flags = property(lambda self: self._host.flags)
    data = property(lambda self: _Pointer(self._host.ctypes.data))
    T = property(lambda self: ndarray(self._host.T, self._alloc))

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        """As CuPy's (version 3): the "device" pointer, shape and strides (None when
        C-contiguous); here the pointer is host memory."""
        host = self._host
        return {"shape": host.shape, "typestr": host.dtype.str, "version": 3,
                "data": (host.ctypes.data, False),
                "strides": None if host.flags.c_contiguous else host.strides}

    def astype(self, dtype: Any, order: str = "K", copy: bool = True, **kw: Any) -> ndarray:
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _to_device(self._host.astype(dtype, order=order))

    def copy(self, order: str = "C") -> ndarray:
        return _to_device(self._host.copy(order=order))

    def __getattr__(self, name: str) -> Any:
        if name not in _METHODS:
            raise AttributeError(f"emulated device arrays do not model ndarray.{name}")
        method = getattr(self._host, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return _wrap(method(*_unwrap(args, name), **_unwrap(kwargs, name)), self._alloc)

        return call

    # -- Python protocols (CuPy allows these on size-1 arrays; each is a device sync)
    def __float__(self) -> float:
        return float(self._host)

    def __int__(self) -> int:
        return int(self._host)

    def __index__(self) -> int:
        return self._host.__index__()

    def __bool__(self) -> bool:
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
    """A stream handle; launches run to completion, so streams only key per-stream state."""

    _next = 16

    def __init__(self, non_blocking: bool = False, ptr: int | None = None) -> None:
        if ptr is None:
            ptr, _Stream._next = _Stream._next, _Stream._next + 16
        self.ptr = ptr
        self.non_blocking = non_blocking

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> _Stream:
        _current.stack = [*_stack(), self]
        return self

    def __exit__(self, *exc: Any) -> None:
        _current.stack = _stack()[:-1]


_current = threading.local()
_NULL = _Stream(ptr=0)  # the legacy default stream
_PER_THREAD = _Stream(ptr=2)  # cudaStreamPerThread: one handle for every thread's own stream
per_thread_default_stream = False  # CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1


def _stack() -> list[_Stream]:
    return getattr(_current, "stack", [])


def get_current_stream() -> _Stream:
    """The innermost ``with stream:`` of this thread, else the default stream (CuPy's rule)."""
    stack = _stack()
    if stack:
        return stack[-1]
    return _PER_THREAD if per_thread_default_stream else _NULL


class _Device:
    def __init__(self, device: int | None = None) -> None:
        self.id = 0 if device is None else int(device)

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


cuda = types.SimpleNamespace(Stream=_Stream, Device=_Device, get_current_stream=get_current_stream,
                             is_available=lambda: True)


def asarray(a: Any, dtype: Any = None, order: Any = None) -> ndarray:
    if isinstance(a, ndarray):
        return a if dtype is None else a.astype(dtype, copy=False)
    return _to_device(np.asarray(a, dtype=dtype))


def array(a: Any, dtype: Any = None, copy: bool = True) -> ndarray:
    if isinstance(a, ndarray):
        return a.astype(a.dtype if dtype is None else dtype)
    return _to_device(np.array(a, dtype=dtype))


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    if not isinstance(a, ndarray):
        raise TypeError(f"Argument 'a' has incorrect type (expected cupy.ndarray, got "
                        f"{type(a).__name__})")
    if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return _to_device(np.ascontiguousarray(a._host, dtype=dtype))


def asnumpy(a: Any, stream: Any = None) -> np.ndarray:
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def empty(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return _fresh(shape, dtype)


def empty_like(a: ndarray, dtype: Any = None) -> ndarray:
    return _fresh(a.shape, a.dtype if dtype is None else dtype)


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

"""Argument checks shared by the functional API and the layers.

Every check raises before anything is computed or written, with a message that names the argument
and says what was expected.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._dtypes import BFLOAT16, FLOAT_DTYPES, NAMES
from .backends.dispatch import array_kind

MAX_COUNT = int(np.iinfo(np.int64).max)  # counts of values are int64 wherever they are stored


def _describe(value: Any) -> str:
    cls = type(value)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"


def check_array(value: Any, arg: str) -> str:
    """Return the array kind of ``value`` or raise ``TypeError`` naming ``arg``."""
    kind = array_kind(value)
    if kind is None:
        raise TypeError(f"{arg} must be a numpy.ndarray or cupy.ndarray, got {_describe(value)}")
    if isinstance(value, np.ma.MaskedArray):  # the mask would be silently ignored
        raise TypeError(f"{arg} must be a plain ndarray, got a numpy.ma.MaskedArray (its mask "
                        f"cannot be honoured; pass {arg}.filled(...) or numpy.asarray({arg}))")
    return kind


def signature(a: Any) -> Any:
    """What the array checks of ``a`` depend on: its type, shape, strides, dtype and, for NumPy,
    writeability (None for None). A call whose arrays and options match one that passed its
    checks passes them too, so checked signatures are cached. Raises AttributeError for
    anything that is not an array (whose checks then run and say what is wrong)."""
    if a is None:
        return None
    cls = a.__class__
    if cls is np.ndarray:
        return (cls, a.shape, a.strides, a.dtype, a.flags.writeable)
    return (cls, a.shape, a.strides, a.dtype)


class CheckedCalls:
    """Call signatures that passed every check, with what the checks found (axis, layout, ...);
    bounded, cleared when full.

    A key (:meth:`key`) holds each array's :func:`signature` and each option with its type (so
    that ``True`` and ``1`` differ), and the backend setting in force; scalars whose value
    changes from call to call (``eps``, ``momentum``) stay out of it and are checked every time.
    """

    def __init__(self, size: int = 512) -> None:
        self.table: dict[tuple, Any] = {}
        self.size = size

    @staticmethod
    def key(arrays: tuple, options: tuple, backend: str) -> tuple | None:
        """The key of a call, or None where an argument cannot be looked up (not an array):
        its checks then run in full. One flat tuple: the backend, each option's type and value,
        then each array's :func:`signature` fields (its type first, or None for None)."""
        parts: list = [backend]
        for o in options:
            parts += (o.__class__, o)
        try:
            for a in arrays:
                if a is None:
                    parts.append(None)
                    continue
                cls = a.__class__
                if cls is np.ndarray:
                    parts += (cls, a.shape, a.strides, a.dtype, a.flags.writeable)
                else:
                    parts += (cls, a.shape, a.strides, a.dtype)
        except AttributeError:
            return None
        return tuple(parts)

    def get(self, key: tuple | None) -> Any:
        """The checked call's entry, or None (also for a key that cannot be hashed: an
        unhashable option, whose checks then run in full and say what is wrong)."""
        if key is None:
            return None
        try:
            return self.table.get(key)
        except TypeError:
            return None

    def put(self, key: tuple | None, value: Any) -> None:
        if key is not None:
            if len(self.table) >= self.size:
                self.table.clear()
            try:
                self.table[key] = value
            except TypeError:  # unhashable: not cached
                pass


def check_float(value: Any, arg: str) -> None:
    if value.dtype not in FLOAT_DTYPES:
        order = " in non-native byte order" if value.dtype.kind == "f" and \
            not value.dtype.isnative else ""
        raise TypeError(f"{arg} must have a floating dtype ({NAMES}), got {value.dtype}{order}")


def check_dtype(dtype: Any, arg: str = "dtype") -> np.dtype:
    """A float16/bfloat16/float32/float64 dtype from anything ``numpy.dtype`` accepts; None
    means float32."""
    if dtype is None:
        return np.dtype(np.float32)
    if array_kind(dtype) is not None:  # numpy.dtype would read an array as its dtype
        raise TypeError(f"{arg} must be a dtype (e.g. numpy.float32 or 'float32'), got an array")
    try:
        resolved = np.dtype(dtype)
    except Exception as exc:  # noqa: BLE001 - numpy raises Type/Value/Syntax/Overflow errors here
        raise TypeError(f"{arg} must be a NumPy floating dtype, got {dtype!r} "
                        f"({type(exc).__name__}: {exc})") from exc
    if resolved not in FLOAT_DTYPES:
        raise TypeError(f"{arg} must be {NAMES}, got {resolved}")
    return resolved


def check_input(x: Any, arg: str = "input") -> str:
    kind = check_array(x, arg)
    check_float(x, arg)
    if x.ndim < 2:
        raise ValueError(f"{arg} must have at least 2 dimensions (N, C, ...), got shape {x.shape}")
    return kind


def check_axis(axis: Any, ndim: int, arg: str = "axis") -> int:
    if type(axis) is int and 0 < axis < ndim:
        return axis
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{arg} must be an int, got {_describe(axis)}")
    if not -ndim <= int(axis) < ndim:
        raise ValueError(f"{arg}={axis} is out of range for a {ndim}-D input "
                         f"(expected {-ndim} <= axis < {ndim})")
    axis = int(axis) % ndim
    if axis == 0:
        raise ValueError(f"{arg} must not be the batch axis 0: the channel axis is 1 (NC...) "
                         f"or -1 (N...C)")
    return axis


def check_bool(value: Any, arg: str) -> bool:
    if value is True or value is False:
        return value
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{arg} must be a bool, got {_describe(value)}")
    return bool(value)


def _short(value: Any) -> str:
    """``repr`` of a scalar argument, shortened (a 400-digit int is not worth printing)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def check_real(value: Any, arg: str, expected: str = "a real number") -> float:
    """``float(value)`` for a real number (not a bool); ``ValueError`` when out of float range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{arg} must be {expected}, got {_describe(value)}")
    try:
        return float(value)
    except OverflowError as exc:
        raise ValueError(f"{arg} must be {expected}, got {_short(value)} (beyond float "
                         f"range)") from exc


def check_eps(eps: Any) -> float:
    if type(eps) is float and 0.0 < eps < math.inf:
        return eps
    value = check_real(eps, "eps", "a real number")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"eps must be finite and > 0, got {_short(eps)}")
    return value


def check_momentum(momentum: Any, allow_none: bool) -> float | None:
    if type(momentum) is float and 0.0 <= momentum <= 1.0:
        return momentum
    if momentum is None and allow_none:
        return None
    expected = "a real number in [0, 1] or None" if allow_none else "a real number in [0, 1]"
    value = check_real(momentum, "momentum", expected)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"momentum must be in [0, 1], got {_short(momentum)}")
    return value


def check_int(value: Any, arg: str, minimum: int = 0, maximum: int = MAX_COUNT) -> int:
    """An integer (not a bool) in ``[minimum, maximum]``; a count unless told otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{arg} must be an int, got {_describe(value)}")
    if not minimum <= int(value) <= maximum:
        limit = " (int64)" if maximum == MAX_COUNT else ""
        raise ValueError(f"{arg} must be an int in [{minimum}, {maximum}]{limit}, got "
                         f"{_short(value)}")
    return int(value)


def check_num_features(num_features: Any, arg: str = "num_features") -> int:
    return check_int(num_features, arg, minimum=1)


def check_channel_vector(value: Any, arg: str, channels: int, writable: bool = False) -> str:
    """Check a per-channel vector (weight, bias, running or saved statistics).

    ``writable`` vectors are updated in place: they must be writeable and their elements must
    not overlap one another (a zero-stride broadcast view, say); see :func:`check_no_overlap`.
    """
    kind = check_array(value, arg)
    check_float(value, arg)
    if value.shape != (channels,):
        raise ValueError(f"{arg} must have shape ({channels},) to match the {channels} channels "
                         f"of input, got shape {value.shape}")
    if writable:
        if value.dtype == BFLOAT16:
            raise TypeError(f"{arg} is updated in place and must be float16, float32 or float64, "
                            f"not bfloat16 (8 mantissa bits lose the small steps of a running "
                            f"average; keep running statistics in float32)")
        if kind == "numpy" and not value.flags.writeable:
            raise ValueError(f"{arg} is updated in place and must be writeable")
        if channels > 1 and abs(value.strides[0]) < value.itemsize:
            raise ValueError(f"{arg} is updated in place, but its elements overlap one another "
                             f"(stride {value.strides[0]} bytes for {value.itemsize}-byte "
                             f"elements, e.g. a broadcast view): pass an array with its own "
                             f"memory per element")
    return kind


def _addresses(a: Any) -> np.ndarray:
    """A NumPy array with ``a``'s memory layout (address, shape, strides), for overlap arithmetic
    only: for a device array it points at device memory and is never read."""
    if isinstance(a, np.ndarray):
        return a
    return np.asarray(_Layout(a.__cuda_array_interface__))


class _Layout:
    """An object whose ``__array_interface__`` describes another array's memory layout."""

    __slots__ = ("__array_interface__",)

    def __init__(self, interface: dict) -> None:
        self.__array_interface__ = {"data": interface["data"], "shape": interface["shape"],
                                    "strides": interface.get("strides"),
                                    "typestr": interface["typestr"], "version": 3}


_TOO_HARD = getattr(np, "exceptions", np).TooHardError
_MAX_WORK: Any = 100_000  # bounded exact overlap search (NumPy's stubs only admit -1 and 0)


def _extent(a: Any) -> tuple[int, int]:
    """The bytes ``[lo, hi)`` a (non-empty) device array's elements lie in."""
    lo = hi = a.data.ptr
    if a.flags.c_contiguous:
        return lo, lo + a.nbytes
    for n, stride in zip(a.shape, a.strides, strict=True):
        if stride > 0:
            hi += (n - 1) * stride
        else:
            lo += (n - 1) * stride
    return lo, hi + a.itemsize


def _exactly_overlap(a: Any, b: Any) -> bool:
    """Whether two arrays whose byte ranges meet share a byte (exact; conservative when the
    exact problem is too large to solve)."""
    try:
        return bool(np.shares_memory(_addresses(a), _addresses(b), max_work=_MAX_WORK))
    except _TOO_HARD:
        return True


def byte_spans(arrays: tuple) -> tuple:
    """``(i, lo, hi)`` for each array ``arrays[i]`` that is neither None nor empty: the bytes
    ``[lo, hi)`` its elements lie in, relative to its first element's address. What
    :func:`apart` needs besides the data pointers, fixed by the arrays' shapes, strides and
    dtypes (so a call signature's entry keeps it)."""
    spans: list = []
    for i, a in enumerate(arrays):
        if a is None or not a.size:
            continue
        lo = hi = 0
        for n, stride in zip(a.shape, a.strides, strict=True):
            if stride > 0:
                hi += (n - 1) * stride
            else:
                lo += (n - 1) * stride
        spans.append((i, lo, hi + a.itemsize))
    return tuple(spans)


def _owner(a: Any) -> Any:
    """The NumPy array owning ``a``'s memory, or None when that is not an ndarray owning its
    data (a buffer, a memory map, memory of another library)."""
    root = a
    base = root.base
    while base is not None:
        if not isinstance(base, np.ndarray):
            return None
        root, base = base, base.base
    return root if root.flags.owndata else None


def apart(arrays: tuple, written: int, spans: tuple | None = None) -> bool:
    """True when none of the first ``written`` arrays (the first one given) can share memory
    with any other of ``arrays`` (None skipped), decided without the exact test: NumPy arrays
    whose memory belongs to different owning arrays, device arrays whose byte ranges (data
    pointer plus :func:`byte_spans`) do not meet. False means "maybe": :func:`check_no_overlap`
    decides.
    """
    if isinstance(arrays[0], np.ndarray):
        owners: list = []
        for i, a in enumerate(arrays):
            if a is None:
                continue
            owner = _owner(a)
            if owner is None:
                return False
            for mine in owners:
                if owner is mine:
                    return False
            if i < written:
                owners.append(owner)
        return True
    if spans is None:
        return False
    ranges: list = []  # the written arrays' byte ranges
    for i, lo, hi in spans:
        ptr = arrays[i].data.ptr
        lo += ptr
        hi += ptr
        for mine_lo, mine_hi in ranges:
            if lo < mine_hi and mine_lo < hi:
                return False
        if i < written:
            ranges.append((lo, hi))
    return True


def check_no_overlap(written: Mapping[str, Any], read: Mapping[str, Any]) -> None:
    """Arrays updated in place must not share memory with each other or with any argument.

    Call after :func:`check_same_kind`; None and empty arrays are skipped. One pass over the
    pairs that involve a written array: byte ranges (NumPy's bounds check, or each device
    array's extent computed once) settle almost every pair, the exact test the rest. Raises
    ``ValueError`` naming every overlapping pair before anything is written.
    """
    arrays = [(arg, a) for arg, a in (*written.items(), *read.items())
              if a is not None and a.size]
    count = sum(1 for arg, a in written.items() if a is not None and a.size)
    host = bool(arrays) and isinstance(arrays[0][1], np.ndarray)
    extents = None if host else [_extent(a) for _, a in arrays]
    pairs = []
    for i in range(count):
        first, a = arrays[i]
        for j in range(i + 1, len(arrays)):
            second, b = arrays[j]
            if host:
                meet = np.may_share_memory(a, b)
            else:
                (alo, ahi), (blo, bhi) = extents[i], extents[j]  # type: ignore[index]
                meet = alo < bhi and blo < ahi
            if meet and _exactly_overlap(a, b):
                pairs.append((first, second))
    if pairs:
        listing = "; ".join(f"{first} and {second}" for first, second in pairs)
        raise ValueError(f"arrays updated in place must not share memory with another "
                         f"argument: {listing} overlap (pass separate arrays, e.g. .copy())")


def check_same_kind(kinds: Mapping[str, str]) -> str:
    """Return the one array kind of all arguments, or raise ``TypeError`` naming the odd ones."""
    distinct = set(kinds.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{arg} is a {kind}.ndarray" for arg, kind in kinds.items())
        raise TypeError(f"all array arguments must be of one kind (all numpy or all cupy): "
                        f"{listing}")
    return distinct.pop()


def check_count(x: Any, axis: int) -> int:
    """Values per channel in training; torch's message when there is exactly one (an empty
    batch is no error: it gives an empty output, as in torch)."""
    count = x.size // x.shape[axis] if x.shape[axis] else 0
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, "
                         f"got input size {tuple(x.shape)}")
    return count


ACTIVATIONS = (None, "relu")


def check_choice(value: Any, arg: str, choices: tuple[str | None, ...]) -> Any:
    """One of ``choices`` (strings, and None where listed): ``TypeError`` for anything that is
    not a str (arrays included), ``ValueError`` for an unknown name."""
    if not (isinstance(value, str) or (value is None and None in choices)):
        raise TypeError(f"{arg} must be one of {choices}, got {_describe(value)}")
    if value not in choices:
        raise ValueError(f"{arg} must be one of {choices}, got {_short(value)}")
    return value


def check_activation(activation: Any) -> bool:
    """True for ``"relu"``, False for None; anything else is an error."""
    if activation is None:
        return False
    return check_choice(activation, "activation", ACTIVATIONS) == "relu"


THREADS_VARIABLE = "BNCUPY_NUM_THREADS"


# os.environ's own table (what os.environ.get reads), looked up without its per-call key and
# value encoding; os.environ.get where the platform's os module has no such table.
_ENVIRON = getattr(os.environ, "_data", None)
_THREADS_KEY: Any = None
try:
    _THREADS_KEY = os.environ.encodekey(THREADS_VARIABLE)
except (AttributeError, TypeError):
    _ENVIRON = None


def check_environment() -> None:
    """The NumPy backend's environment: ``BNCUPY_NUM_THREADS`` unset, empty or an int >= 1."""
    if _ENVIRON is not None and not _ENVIRON.get(_THREADS_KEY):
        return
    value = os.environ.get(THREADS_VARIABLE)
    if not value:
        return
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"environment variable {THREADS_VARIABLE} must be an integer >= 1 "
                         f"(the NumPy backend's thread count), got {_short(value)}")


def check_like_input(value: Any, arg: str, x: Any) -> str:
    """An array the shape of the input (residual, grad_output); returns its kind."""
    kind = check_array(value, arg)
    check_float(value, arg)
    if value.shape != x.shape:
        raise ValueError(f"{arg} must have the shape of input {tuple(x.shape)}, "
                         f"got {tuple(value.shape)}")
    return kind

"""Argument checks shared by the functional API and the layers.

Every check raises before anything is computed or written, with a message that names the argument
and says what was expected.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from .backends.dispatch import array_kind

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _describe(value: Any) -> str:
    cls = type(value)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"


def check_array(value: Any, arg: str) -> str:
    """Return the array kind of ``value`` or raise ``TypeError`` naming ``arg``."""
    kind = array_kind(value)
    if kind is None:
        raise TypeError(f"{arg} must be a numpy.ndarray or cupy.ndarray, got {_describe(value)}")
    return kind


def check_float(value: Any, arg: str) -> None:
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{arg} must have a floating dtype (float16, float32 or float64), "
                        f"got {value.dtype}")


def check_dtype(dtype: Any, arg: str = "dtype") -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{arg} must be a NumPy floating dtype, got {dtype!r}") from exc
    if resolved not in FLOAT_DTYPES:
        raise TypeError(f"{arg} must be float16, float32 or float64, got {resolved}")
    return resolved


def check_input(x: Any, arg: str = "input") -> str:
    kind = check_array(x, arg)
    check_float(x, arg)
    if x.ndim < 2:
        raise ValueError(f"{arg} must have at least 2 dimensions (N, C, ...), got shape {x.shape}")
    return kind


def check_axis(axis: Any, ndim: int, arg: str = "axis") -> int:
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
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{arg} must be a bool, got {_describe(value)}")
    return bool(value)


def check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {_describe(eps)}")
    value = float(eps)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    return value


def check_momentum(momentum: Any, allow_none: bool) -> float | None:
    if momentum is None and allow_none:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        expected = "a real number in [0, 1] or None" if allow_none else "a real number in [0, 1]"
        raise TypeError(f"momentum must be {expected}, got {_describe(momentum)}")
    value = float(momentum)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return value


def check_num_features(num_features: Any) -> int:
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise TypeError(f"num_features must be an int, got {_describe(num_features)}")
    if int(num_features) < 1:
        raise ValueError(f"num_features must be >= 1, got {num_features}")
    return int(num_features)


def check_channel_vector(value: Any, arg: str, channels: int, writable: bool = False) -> str:
    """Check a per-channel vector (weight, bias, running or saved statistics)."""
    kind = check_array(value, arg)
    check_float(value, arg)
    if value.shape != (channels,):
        raise ValueError(f"{arg} must have shape ({channels},) to match the {channels} channels "
                         f"of input, got shape {value.shape}")
    if writable and kind == "numpy" and not value.flags.writeable:
        raise ValueError(f"{arg} is updated in place and must be writeable")
    return kind


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


def check_activation(activation: Any) -> bool:
    """True for ``"relu"``, False for None; anything else is an error."""
    if activation not in ACTIVATIONS or not (activation is None or isinstance(activation, str)):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation == "relu"


def check_like_input(value: Any, arg: str, x: Any) -> str:
    """An array the shape of the input (residual, grad_output); returns its kind."""
    kind = check_array(value, arg)
    check_float(value, arg)
    if value.shape != x.shape:
        raise ValueError(f"{arg} must have the shape of input {tuple(x.shape)}, "
                         f"got {tuple(value.shape)}")
    return kind

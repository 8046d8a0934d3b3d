"""Array-module-agnostic per-channel math shared by the backends and SyncBatchNorm: the one Chan
et al. merge of Welford partials, and the coefficients of the forward and backward elementwise
passes. Everything here is O(C) and works on NumPy and CuPy arrays alike."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

F = TypeVar("F", bound=Callable[..., Any])


try:  # NumPy 2: what np.errstate sets, without building and entering an errstate object
    from numpy._core._ufunc_config import (  # type: ignore[attr-defined]
        _extobj_contextvar,
        _make_extobj,
    )
except ImportError:  # NumPy 1.x
    _extobj_contextvar = None


def quiet(fn: F) -> F:
    """``fn`` with NumPy's floating-point warnings off: inf and NaN in the data propagate per
    IEEE, which the library promises, and are no reason to warn (``inf - inf`` in a centred
    sum, an overflow to inf in a float16 output)."""
    if _extobj_contextvar is None:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with np.errstate(all="ignore"):
                return fn(*args, **kwargs)
        return run  # type: ignore[return-value]

    @functools.wraps(fn)
    def run_quietly(*args: Any, **kwargs: Any) -> Any:  # np.errstate(all="ignore"), 4x cheaper
        token = _extobj_contextvar.set(_make_extobj(all="ignore"))
        try:
            return fn(*args, **kwargs)
        finally:
            _extobj_contextvar.reset(token)
    return run_quietly  # type: ignore[return-value]


@quiet
def _astype(a: Any, dtype: Any) -> Any:
    return a.astype(dtype)


def cast(a: Any, dtype: Any) -> Any:
    """``a`` in ``dtype`` (``a`` itself when it is of it): a value beyond the range of ``dtype``
    becomes inf, as torch's do, without NumPy's overflow warning (the gradient of a float16
    weight, a float16 running variance)."""
    return a if a.dtype == dtype else _astype(a, dtype)


Partial = tuple[Any, Any, Any]  # (count: int or per-channel int array, mean, m2)


def merge(a: Partial, b: Partial) -> Partial:
    """Merge two ``(count, mean, m2)`` partials (Chan et al.). Counts are ints (all channels
    alike) or per-channel integer arrays; an empty side leaves the other unchanged."""
    na, ma, qa = a
    nb, mb, qb = b
    if np.ndim(na) == 0 and np.ndim(nb) == 0:
        if nb == 0:
            return a
        if na == 0:
            return b
    n = na + nb
    wb = nb / np.maximum(n, 1)
    delta = mb - ma
    return n, ma + delta * wb, qa + qb + delta * delta * na * wb


def merge_equal(means: Any, m2s: Any, n_each: int) -> Partial:
    """Merge k partials of ``n_each`` values each (``means``, ``m2s`` of shape (k, C)) at once:
    the closed form of k - 1 Chan merges, ``M2 = sum(m2) + n * sum((mean_i - mean)^2)``."""
    mean = means.mean(axis=0)
    m2 = m2s.sum(axis=0) + n_each * ((means - mean) ** 2).sum(axis=0)
    return n_each * means.shape[0], mean, m2


def compute_dtype(dtype: Any) -> np.dtype:
    """Element arithmetic dtype: float32 for float16 and float32, float64 for float64."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def forward_coefficients(mean: Any, invstd: Any, weight: Any, bias: Any, dtype: Any,
                         ) -> tuple[Any, Any, Any]:
    """``center, scale, shift`` with ``(x - center) * scale + shift`` equal to the textbook
    ``(x - mean) * invstd * weight + bias``; ``center`` is ``mean`` rounded to the compute dtype
    and ``shift`` absorbs the rounding, so a constant channel maps to exactly ``bias``."""
    mean, invstd = mean.astype(np.float64), invstd.astype(np.float64)
    center = mean.astype(compute_dtype(dtype))
    scale = invstd if weight is None else invstd * weight.astype(np.float64)
    shift = -(mean - center) * scale
    if bias is not None:
        shift = shift + bias.astype(np.float64)
    return center, scale, shift


def backward_coefficients(mean: Any, invstd: Any, weight: Any, sum_dy: Any, sum_dy_xmu: Any,
                          count: int, training: bool, dtype: Any) -> tuple[Any, ...]:
    """From per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``: ``center, a, b, c`` with
    ``dx = a * dy + b * (x - center) + c``, and float64 ``grad_weight``, ``grad_bias``.

    Training (batch statistics): ``dx = w*invstd*(dy - mean(dy) - xhat*mean(dy*xhat))``;
    eval: ``dx = w*invstd*dy``. ``center`` is ``mean`` in the compute dtype; ``c`` absorbs the
    rounding.
    """
    mean, invstd = mean.astype(np.float64), invstd.astype(np.float64)
    center = mean.astype(compute_dtype(dtype))
    residual = mean - center
    sum_dy, sum_dy_xmu = sum_dy.astype(np.float64), sum_dy_xmu.astype(np.float64)
    a = invstd if weight is None else invstd * weight.astype(np.float64)
    if training and count > 0:
        b = -a * invstd * invstd * sum_dy_xmu / count
        c = -a * sum_dy / count - b * residual
    else:
        b = c = a * 0.0
    return center, a, b, c, sum_dy_xmu * invstd, sum_dy

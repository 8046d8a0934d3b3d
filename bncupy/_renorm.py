"""Batch Renormalization (Ioffe 2017) and ghost batch normalization, on batch norm's kernels.

Renormalization corrects the batch statistics towards the running ones:
``y = weight * ((x - mean) / sigma * r + d) + bias`` with ``sigma = sqrt(var + eps)``,
``r = clip(sigma / sigma_running, 1/rmax, rmax)`` and
``d = clip((mean - running_mean) / sigma_running, -dmax, dmax)``, ``sigma_running =
sqrt(running_var + eps)``; ``r`` and ``d`` are constants for the gradient. That is batch norm's
apply with ``invstd = r / sigma`` and ``bias + weight * d``, so it runs on the same statistics,
apply and backward kernels. Ghost batch norm normalizes virtual sub-batches of the batch each
with its own statistics, updating the running statistics once per sub-batch, in order.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from . import _validation as v
from ._docstrings import parameters_from
from ._functional import _caller, _check_forward, _native, batch_norm_backward, batch_norm_forward
from ._functional import backward as _bn_backward
from .backends._common import cast


class RenormForward(NamedTuple):
    """A training forward's output (caller's kind) and backend-native statistics."""

    y: Any
    mean: Any
    invstd: Any  # 1 / sigma of the batch
    r: Any
    d: Any
    kind: str
    backend: Any

    def saved(self) -> tuple[Any, ...]:
        return tuple(_caller(self.kind, self.backend, a) for a in (self.mean, self.invstd,
                                                                    self.r, self.d))


def check_limits(rmax: Any, dmax: Any) -> tuple[float, float]:
    """``rmax >= 1`` and ``dmax >= 0``, both finite."""
    out = []
    for arg, value, low in (("rmax", rmax, 1.0), ("dmax", dmax, 0.0)):
        number = v.check_real(value, arg, f"a real number >= {low:g}")
        if not (math.isfinite(number) and number >= low):
            raise ValueError(f"{arg} must be finite and >= {low:g}, got {value!r}")
        out.append(number)
    return out[0], out[1]


def forward(input: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any,
            momentum: Any, eps: Any, rmax: Any, dmax: Any, axis: Any) -> RenormForward:
    """Validated training forward of batch renormalization; updates the running statistics."""
    if running_mean is None or running_var is None:
        raise ValueError("batch renormalization needs running_mean and running_var in training "
                         "(r and d compare the batch with them)")
    rmax, dmax = check_limits(rmax, dmax)
    ax, _, momentum, eps, _, kind, be = _check_forward(
        input, running_mean, running_var, weight, bias, True, momentum, eps, axis, None, None)
    x = be.asarray(input)
    count, mean, m2 = be.stats(x, ax)
    xp = be.xp
    mean, var = mean.astype(np.float64), m2.astype(np.float64) / count
    sigma = xp.sqrt(var + eps)
    rm = _native(be, running_mean).astype(np.float64)
    rv = _native(be, running_var).astype(np.float64)
    running_sigma = xp.sqrt(rv + eps)
    r = xp.clip(sigma / running_sigma, 1.0 / rmax, rmax)
    d = xp.clip((mean - rm) / running_sigma, -dmax, dmax)
    w = None if weight is None else _native(be, weight).astype(np.float64)
    shift = d if w is None else w * d
    if bias is not None:
        shift = shift + _native(be, bias).astype(np.float64)
    y, _ = be.normalize_with(x, ax, mean, r / sigma, w, shift)
    for target, value in ((running_mean, (1 - momentum) * rm + momentum * mean),
                          (running_var, (1 - momentum) * rv + momentum * var * (
                              count / (count - 1)))):
        target[...] = _caller(kind, be, cast(value, target.dtype))
    return RenormForward(_caller(kind, be, y.astype(input.dtype, copy=False)), mean,
                         1.0 / sigma, r, d, kind, be)


def backward(grad_output: Any, input: Any, weight: Any, mean: Any, invstd: Any, r: Any, d: Any,
             axis: Any, names: tuple[str, str] = ("save_mean", "save_invstd"),
             ) -> tuple[Any, Any, Any]:
    """Gradients through the batch statistics with ``r`` and ``d`` held constant: batch norm's
    backward with the weight ``weight * r``; ``grad_weight = r * sum(dy*xhat0) + d * sum(dy)``."""
    kinds = {"input": v.check_input(input)}
    channels = input.shape[v.check_axis(axis, input.ndim)]
    for arg, value in (("r", r), ("d", d)):
        kinds[arg] = v.check_channel_vector(value, arg, channels)
    v.check_same_kind(kinds)
    effective = r if weight is None else weight * r
    dx, dw0, db = _bn_backward(grad_output, input, effective, mean, invstd, True, axis, names)
    grad_weight = r * dw0 + d * db
    dtype = weight.dtype if weight is not None else dw0.dtype
    return dx, grad_weight.astype(dtype), db.astype(dtype)


@parameters_from(batch_norm_forward)
def batch_renorm_forward(input: Any, running_mean: Any, running_var: Any, weight: Any = None,
                         bias: Any = None, training: bool = False, momentum: float = 0.1,
                         eps: float = 1e-5, *, rmax: float = 3.0, dmax: float = 5.0,
                         axis: int = 1) -> tuple[Any, Any, Any, Any, Any]:
    """Batch renormalization (Ioffe 2017) with the statistics its backward pass needs.

    Normalizes with the batch statistics corrected towards the running ones,
    ``y = weight * ((x - mean) / sigma * r + d) + bias``, with ``r`` and ``d`` constants for the
    gradient; ``rmax=1, dmax=0`` is batch norm. Evaluation is batch norm's.

    Parameters
    ----------
    running_mean, running_var : ndarray, shape (C,)
        Running statistics (required): updated in place in training, used in eval.
    rmax : float >= 1, keyword-only
        Clip of ``r = sigma_batch / sigma_running`` to ``[1/rmax, rmax]``.
    dmax : float >= 0, keyword-only
        Clip of ``d = (mean_batch - running_mean) / sigma_running`` to ``[-dmax, dmax]``.

    Returns
    -------
    y : ndarray
        Same shape, dtype, array kind and memory layout as ``input``.
    save_mean, save_invstd, r, d : ndarray, shape (C,)
        Batch mean, ``1/sigma_batch`` and the corrections (training); in eval the running
        statistics with ``r = 1``, ``d = 0``.

    Raises
    ------
    TypeError
        As :func:`batch_norm_forward`.
    ValueError
        As :func:`batch_norm_forward`, and for ``rmax < 1`` or ``dmax < 0``.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((64, 16), np.float32)
    >>> running_mean, running_var = np.zeros(16, np.float32), np.ones(16, np.float32)
    >>> y, mean, invstd, r, d = bn.batch_renorm_forward(
    ...     x, running_mean, running_var, training=True, rmax=2.0, dmax=1.0)
    >>> bool(((r >= 0.5) & (r <= 2.0)).all()), bool((abs(d) <= 1.0).all())
    (True, True)
    """
    if not v.check_bool(training, "training"):
        check_limits(rmax, dmax)
        from ._functional import forward as bn_forward

        evaluated = bn_forward(input, running_mean, running_var, weight, bias, False, momentum,
                               eps, axis)
        mean, invstd = evaluated.saved()
        return evaluated.y, mean, invstd, invstd * 0 + 1, invstd * 0
    out = forward(input, running_mean, running_var, weight, bias, momentum, eps, rmax, dmax,
                  axis)
    dtype = np.float64 if input.dtype == np.float64 else np.float32
    return (out.y, *(a.astype(dtype) for a in out.saved()))


@parameters_from(batch_renorm_forward)
def batch_renorm(input: Any, running_mean: Any, running_var: Any, weight: Any = None,
                 bias: Any = None, training: bool = False, momentum: float = 0.1,
                 eps: float = 1e-5, *, rmax: float = 3.0, dmax: float = 5.0,
                 axis: int = 1) -> Any:
    """Batch renormalization (Ioffe 2017).

    As :func:`batch_renorm_forward`, without the saved statistics and corrections.

    Returns
    -------
    ndarray
        Same shape, dtype, array kind and memory layout as ``input``.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((64, 16), np.float32)
    >>> running_mean, running_var = np.zeros(16, np.float32), np.ones(16, np.float32)
    >>> bn.batch_renorm(x, running_mean, running_var, training=True).shape
    (64, 16)
    """
    return batch_renorm_forward(input, running_mean, running_var, weight, bias, training,
                                momentum, eps, rmax=rmax, dmax=dmax, axis=axis)[0]


@parameters_from(batch_norm_backward)
def batch_renorm_backward(grad_output: Any, input: Any, weight: Any, save_mean: Any,
                          save_invstd: Any, r: Any, d: Any, *, axis: int = 1,
                          ) -> tuple[Any, Any, Any]:
    """Gradients of a training :func:`batch_renorm_forward` (``r``, ``d`` held constant).

    Parameters
    ----------
    save_mean, save_invstd, r, d : ndarray, shape (C,)
        As returned by :func:`batch_renorm_forward` in training.

    Returns
    -------
    grad_input : ndarray
        Same shape, dtype and kind as ``input``.
    grad_weight, grad_bias : ndarray, shape (C,)
        Per-channel parameter gradients.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((64, 16), np.float32)
    >>> running_mean, running_var = np.zeros(16, np.float32), np.ones(16, np.float32)
    >>> y, *saved = bn.batch_renorm_forward(x, running_mean, running_var,
    ...                                     training=True)
    >>> dy = np.ones_like(y)
    >>> dx, dweight, dbias = bn.batch_renorm_backward(dy, x, None, *saved)
    >>> dx.shape, dbias[:3]
    ((64, 16), array([64., 64., 64.], dtype=float32))
    """
    return backward(grad_output, input, weight, save_mean, save_invstd, r, d, axis)


def ghost_slices(batch: int, size: Any) -> list[slice]:
    """The virtual sub-batches of a batch of ``batch`` samples, ``size`` samples each (the last
    may be smaller)."""
    size = v.check_int(size, "ghost_batch_size", minimum=1)
    return [slice(i, min(i + size, batch)) for i in range(0, batch, size)]

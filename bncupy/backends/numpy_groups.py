"""NumPy reference for the normalizations over groups (see :mod:`._groups`): float64 arithmetic,
vectorised over every group at once.

Passes over memory, forward: one to read each group's first value (the pilot) and form
``x - pilot`` in float64, one for the mean, one for the variance of the centred values, one to
write ``y``. Backward: ``xhat`` and ``w * dy`` in float64, their group means, one pass for ``dx``
and the per-channel sums. Shifting by the pilot makes a constant group exactly zero, so it maps to
exactly ``bias``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import quiet
from ._groups import GroupLayout


def _view4(a: np.ndarray, lay: GroupLayout) -> np.ndarray:
    """``a`` as ``(n, groups per sample, channels per group, s)`` (a view)."""
    if lay.kind == "rows":
        return a.reshape(lay.n, 1, lay.c, 1)
    g = lay.c // lay.k
    if lay.kind == "cf":
        return a.reshape(lay.n, g, lay.k, lay.s)
    return a.reshape(lay.n, lay.s, g, lay.k).transpose(0, 2, 3, 1)


def _affine4(v: Any, lay: GroupLayout) -> Any:
    if v is None:
        return None
    v = np.asarray(v, np.float64)
    return v.reshape(1, 1, lay.c, 1) if lay.kind == "rows" else v.reshape(1, -1, lay.k, 1)


@quiet
def group_forward(x: np.ndarray, lay: GroupLayout, weight: Any, bias: Any, eps: float,
                  running: tuple | None = None, keep: bool = True, rms: bool = False,
                  residual: np.ndarray | None = None, sum_dtype: Any = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Any]:
    """Normalize every group; returns ``y``, the float64 per-group mean and invstd (flattened
    in group order), the mean again (what :func:`group_backward` takes) and the residual sum.

    ``running`` is InstanceNorm's ``(running_mean, running_var, momentum)``: they move towards
    the batch average of the instance means and unbiased variances, in place, last. ``rms``
    (rows): RMSNorm, the mean square about 0. ``residual`` (rows): the rows normalized are
    ``h = x + residual`` rounded to the residual's dtype, or to ``sum_dtype``, which also
    returns ``h`` (else None).
    """
    h = None
    source = x
    if residual is not None or sum_dtype is not None:
        total = x.astype(np.float64)
        if residual is not None:
            total += residual
            source = total.astype(residual.dtype if sum_dtype is None else sum_dtype)
        else:
            source = total.astype(sum_dtype)
        if sum_dtype is not None:
            h = source
    x4 = _view4(source, lay)
    if rms:
        centred = x4.astype(np.float64)
        var = np.square(centred).mean(axis=(2, 3), keepdims=True)
        mean = np.zeros(lay.groups)
    else:
        shifted = x4 - x4[:, :, :1, :1].astype(np.float64)
        offset = shifted.mean(axis=(2, 3), keepdims=True)
        centred = shifted - offset
        var = np.square(centred).mean(axis=(2, 3), keepdims=True)
        mean = (x4[:, :, :1, :1].astype(np.float64) + offset).ravel()
    invstd = 1.0 / np.sqrt(var + eps)
    w, b = _affine4(weight, lay), _affine4(bias, lay)
    scale = invstd if w is None else invstd * w
    y = np.empty(x.shape, x.dtype)
    out = centred * scale
    _view4(y, lay)[...] = out if b is None else out + b
    if running is not None:
        running_mean, running_var, momentum = running
        unbiased = var.ravel() * (lay.s / (lay.s - 1))
        for target, value in ((running_mean, mean), (running_var, unbiased)):
            batch = value.reshape(lay.n, lay.c).mean(axis=0)
            target[...] = (1 - momentum) * target.astype(np.float64) + momentum * batch
    return y, mean, invstd.ravel(), mean, h


@quiet
def group_backward(dy: np.ndarray, x: np.ndarray, lay: GroupLayout, weight: Any, mean: Any,
                   invstd: Any, rms: bool = False, grad_sum: np.ndarray | None = None,
                   saved: bool = False, direct: bool = False,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``dx`` (``x``'s dtype) and float64 per-channel ``dweight``, ``dbias`` (columns for rows).

    ``rms`` (rows; ``mean`` None): RMSNorm's gradient. ``grad_sum`` (rows): added to dx, the
    gradient the pre-norm sum receives from its other consumers. ``mean`` and ``invstd``: the
    per-group values in group order, any shape (``saved``, a forward's, and ``direct``,
    contiguous arrays vouched for by the caller, change nothing here).
    """
    x4, dy4 = _view4(x, lay), _view4(dy, lay)
    shape = (lay.n, -1, 1, 1)
    inv = np.asarray(invstd, np.float64).reshape(shape)
    xhat = (x4 if rms else x4 - np.asarray(mean, np.float64).reshape(shape)) * inv
    w = _affine4(weight, lay)
    g = dy4.astype(np.float64) if w is None else dy4 * w
    b = (g * xhat).mean(axis=(2, 3), keepdims=True)
    grad = g - xhat * b if rms else g - g.mean(axis=(2, 3), keepdims=True) - xhat * b
    grad = inv * grad
    if grad_sum is not None:
        grad = grad + _view4(grad_sum, lay)
    dx = np.empty_like(x)
    _view4(dx, lay)[...] = grad
    dweight = (dy4 * xhat).sum(axis=(0, 3)).reshape(-1)
    dbias = dy4.sum(axis=(0, 3), dtype=np.float64).reshape(-1)
    return dx, dweight, dbias

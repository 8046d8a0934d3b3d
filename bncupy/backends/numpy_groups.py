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
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Normalize every group; returns ``y`` and the float64 per-group mean, invstd and (biased)
    variance, flattened in group order."""
    x4 = _view4(x, lay)
    shifted = x4 - x4[:, :, :1, :1].astype(np.float64)
    offset = shifted.mean(axis=(2, 3), keepdims=True)
    centred = shifted - offset
    var = np.square(centred).mean(axis=(2, 3), keepdims=True)
    invstd = 1.0 / np.sqrt(var + eps)
    w, b = _affine4(weight, lay), _affine4(bias, lay)
    scale = invstd if w is None else invstd * w
    y = np.empty_like(x)
    out = centred * scale
    _view4(y, lay)[...] = out if b is None else out + b
    mean = x4[:, :, :1, :1].astype(np.float64) + offset
    return y, mean.ravel(), invstd.ravel(), var.ravel()


@quiet
def group_backward(dy: np.ndarray, x: np.ndarray, lay: GroupLayout, weight: Any, mean: Any,
                   invstd: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``dx`` (``x``'s dtype) and float64 per-channel ``dweight``, ``dbias`` (columns for rows)."""
    x4, dy4 = _view4(x, lay), _view4(dy, lay)
    shape = (lay.n, -1, 1, 1)
    inv = np.asarray(invstd, np.float64).reshape(shape)
    xhat = (x4 - np.asarray(mean, np.float64).reshape(shape)) * inv
    w = _affine4(weight, lay)
    g = dy4.astype(np.float64) if w is None else dy4 * w
    a = g.mean(axis=(2, 3), keepdims=True)
    b = (g * xhat).mean(axis=(2, 3), keepdims=True)
    dx = np.empty_like(x)
    _view4(dx, lay)[...] = inv * (g - a - xhat * b)
    dweight = (dy4 * xhat).sum(axis=(0, 3)).reshape(-1)
    dbias = dy4.sum(axis=(0, 3), dtype=np.float64).reshape(-1)
    return dx, dweight, dbias

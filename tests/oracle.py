"""An independent float64 oracle: textbook batch-norm formulas, no code shared with bncupy."""

from __future__ import annotations

import numpy as np


def _axes(ndim: int, axis: int) -> tuple[int, ...]:
    axis %= ndim
    return tuple(i for i in range(ndim) if i != axis)


def _bcast(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.asarray(v, np.float64).reshape(shape)


def total(a, axes, keepdims=False):
    """Sum over ``axes`` by pairwise summation (error O(eps log n)): NumPy sums pairwise only
    along a contiguous last axis, so the summed axes are moved there first. A strided float64
    sum is recursive, and its error (up to eps n) would be the oracle's own."""
    a = np.asarray(a, np.float64)
    axes = tuple(sorted(i % a.ndim for i in axes))
    kept = [i for i in range(a.ndim) if i not in axes]
    rows = np.ascontiguousarray(a.transpose(*kept, *axes)).reshape(
        *[a.shape[i] for i in kept], -1)
    out = rows.sum(axis=-1)
    if keepdims:
        out = out.reshape([1 if i in axes else a.shape[i] for i in range(a.ndim)])
    return out


def average(a, axes, keepdims=False):
    """Mean over ``axes`` (see :func:`total`)."""
    a = np.asarray(a, np.float64)
    count = int(np.prod([a.shape[i] for i in axes]))
    return total(a, axes, keepdims) / count


def moments(x, axes, keepdims=False):
    """Mean and biased variance over ``axes`` in float64 by the corrected two-pass algorithm
    (Chan, Golub and LeVeque 1983): the mean of the deviations from a first mean corrects it,
    so values far from zero keep the mean to about one ulp."""
    x = np.asarray(x, np.float64)
    first = average(x, axes, keepdims=True)
    d = x - first
    correction = average(d, axes, keepdims=True)
    mu, var = first + correction, average(np.square(d - correction), axes, keepdims=True)
    if keepdims:
        return mu, var
    return np.squeeze(mu, axes), np.squeeze(var, axes)


def forward(x, axis=1, weight=None, bias=None, eps=1e-5, training=True, running_mean=None,
            running_var=None, momentum=0.1):
    """Return (y, mean, invstd, new_running_mean, new_running_var), all float64."""
    x = np.asarray(x, np.float64)
    axes = _axes(x.ndim, axis)
    c = x.shape[axis % x.ndim]
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    b = np.zeros(c) if bias is None else np.asarray(bias, np.float64)
    new_rm = new_rv = None
    if training:
        mean, var = moments(x, axes)
        n = x.size // c
        if running_mean is not None:
            new_rm = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean
            new_rv = ((1 - momentum) * np.asarray(running_var, np.float64)
                      + momentum * var * n / (n - 1))
    else:
        mean = np.asarray(running_mean, np.float64)
        var = np.asarray(running_var, np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x - _bcast(mean, x.ndim, axis)) * _bcast(invstd * w, x.ndim, axis) + _bcast(b, x.ndim, axis)
    return y, mean, invstd, new_rm, new_rv


def backward(dy, x, axis=1, weight=None, eps=1e-5, training=True, running_mean=None,
             running_var=None):
    """Return (dx, dweight, dbias) in float64, by the closed form of the textbook derivative."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    axes = _axes(x.ndim, axis)
    c = x.shape[axis % x.ndim]
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    if training:
        mean, var = moments(x, axes)
    else:
        mean, var = np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - _bcast(mean, x.ndim, axis)) * _bcast(invstd, x.ndim, axis)
    dbias = total(dy, axes)
    dweight = total(dy * xhat, axes)
    g = dy * _bcast(w * invstd, x.ndim, axis)
    if training:
        n = x.size // c
        dx = g - _bcast(dbias / n, x.ndim, axis) * _bcast(w * invstd, x.ndim, axis) \
            - xhat * _bcast(dweight / n, x.ndim, axis) * _bcast(w * invstd, x.ndim, axis)
    else:
        dx = g
    return dx, dweight, dbias


def grouped(x, dy, weight=None, bias=None, eps=1e-5):
    """The normalizations over groups in textbook form on a float64 ``(n, G, K, S)`` view: groups
    are ``[i, g]``, the affine parameters ``(G, K)``. Returns y and (dx, dweight, dbias) of
    ``sum(y * dy)``."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    g_, k_ = x.shape[1:3]
    w = np.ones((g_, k_)) if weight is None else np.asarray(weight, np.float64).reshape(g_, k_)
    b = np.zeros((g_, k_)) if bias is None else np.asarray(bias, np.float64).reshape(g_, k_)
    w4, b4 = w[None, :, :, None], b[None, :, :, None]
    mu, var = moments(x, (2, 3), keepdims=True)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mu) * invstd
    y = xhat * w4 + b4
    g = dy * w4
    dx = invstd * (g - average(g, (2, 3), keepdims=True)
                   - xhat * average(g * xhat, (2, 3), keepdims=True))
    return y, (dx, total(dy * xhat, (0, 3)), total(dy, (0, 3)))


def numerical_gradient(f, x, direction, h=1e-6):
    """Directional derivative of the scalar function ``f`` at ``x`` by central differences."""
    return (f(x + h * direction) - f(x - h * direction)) / (2 * h)


def batch_renorm(x, dy, axis, weight, bias, running_mean, running_var, eps, rmax, dmax,
                 momentum):
    """Batch renormalization with Chainer's ``batch_renormalization`` semantics (r and d from
    sigma = sqrt(var + eps) and sigma_running = sqrt(running_var + eps), held constant for the
    gradient), in float64. The running update is batch norm's (unbiased variance, without
    Chainer's eps). Returns y, r, d, new running mean/var, dx, dweight, dbias."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    axes = _axes(x.ndim, axis)
    m = x.size // x.shape[axis % x.ndim]
    mean, var = moments(x, axes)
    sigma = np.sqrt(var + eps)
    running_sigma = np.sqrt(np.asarray(running_var, np.float64) + eps)
    r = np.clip(sigma / running_sigma, 1 / rmax, rmax)
    d = np.clip((mean - np.asarray(running_mean, np.float64)) / running_sigma, -dmax, dmax)
    x_hat = (x - _bcast(mean, x.ndim, axis)) / _bcast(sigma, x.ndim, axis) * _bcast(
        r, x.ndim, axis) + _bcast(d, x.ndim, axis)
    y = x_hat * _bcast(weight, x.ndim, axis) + _bcast(bias, x.ndim, axis)
    gbeta = total(dy, axes)
    ggamma = total(dy * x_hat, axes)
    # Chainer: gx = gamma * r / sigma * (gy - (x_hat - d) * (ggamma - d * gbeta) / (m * r**2)
    #                                    - gbeta / m), with x_hat0 = (x_hat - d) / r.
    x_hat0 = (x_hat - _bcast(d, x.ndim, axis)) / _bcast(r, x.ndim, axis)
    mean_dy_xhat0 = (ggamma - d * gbeta) / (m * r)
    dx = _bcast(np.asarray(weight, np.float64) * r / sigma, x.ndim, axis) * (
        dy - _bcast(gbeta / m, x.ndim, axis) - x_hat0 * _bcast(mean_dy_xhat0, x.ndim, axis))
    new_rm = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean
    new_rv = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * var * m / (m - 1)
    return y, r, d, new_rm, new_rv, dx, ggamma, gbeta

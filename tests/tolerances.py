"""How far a result may be from the float64 oracle: bounds derived from the dtypes and the
reduction lengths, stated once here and used by every comparison with :mod:`tests.oracle`.

Every normalization is seen as groups of values on an ``(n, G, K, S)`` float64 view (the
oracle's): a group ``[i, g]`` has ``m = K * S`` values and its own mean and variance, the affine
parameters are per ``(g, k)``, and parameter gradients sum over ``n`` and ``S``. Batch norm is
``(1, C, 1, N * spatial)`` (:func:`channels`).

The model, with ``u`` the unit roundoff (``finfo.eps / 2``) of the storage dtype (``ud``), of
the compute dtype the implementations accumulate in (``uc``: float32 for float16 and float32,
float64 for float64) and of float64 (``u64``):

* a sum of ``n`` terms ``t``: ``C_SUM * uc * sqrt(n) * rms(t)`` (the random-walk growth of
  rounding errors; the implementations' blocked, pairwise and tree orders stay below it);
* the mean: ``C_ELEMENT * (uc * sigma + u64 * |mean|)`` (statistics are accumulated on data
  shifted close to the mean, so the error scales with sigma; the float64 mean itself is known to
  ``u64 * |mean|``), and once saved in the compute dtype, ``uc * |mean|`` more;
* the variance, relatively: ``C_ELEMENT * (uc + u64 * |mean| / sigma)`` plus the sum bound of
  the squared deviations;
* an elementwise result: ``C_ELEMENT * uc`` times the sum of the magnitudes of its terms, plus
  the errors of the statistics it uses (propagated to first order), plus one rounding to the
  output dtype, ``ud * |value|``.

The scales (sigma, ``|mean|``, the terms' magnitudes) are measured from the oracle's float64
values. :func:`check` compares, and refuses a bound as wide as the quantity it bounds: an
all-zero result must never pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tests import oracle

C_SUM = 64  # sums of n terms, in units of uc * sqrt(n) * rms(term)
C_ELEMENT = 16  # a few roundings in the compute dtype per elementwise result or statistic


def unit(dtype: Any) -> float:
    """Unit roundoff of ``dtype``: half the distance from 1 to the next value."""
    return float(np.finfo(dtype).eps) / 2


def compute_dtype(dtype: Any) -> np.dtype:
    """The dtype the implementations compute and accumulate in for ``dtype`` data."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def channels(a: Any, axis: int) -> np.ndarray:
    """A batch-norm operand as the ``(1, C, 1, n)`` float64 group view (a copy)."""
    a = np.asarray(a, np.float64)
    moved = np.moveaxis(a, axis, 0)
    return np.ascontiguousarray(moved).reshape(1, a.shape[axis], 1, -1)


def check(actual: Any, expected: Any, bound: Any, name: str, scale: Any = None) -> None:
    """Assert ``|actual - expected| <= bound`` elementwise (NaN where, and only where, the
    oracle has NaN), and that ``bound`` is narrower than the quantity it bounds: the largest
    ``|expected|``, or ``scale``, the size of its terms, where they may cancel (a backward pass
    on two values per channel has ``dx`` = 0 whatever ``dy``)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    bound = np.broadcast_to(np.asarray(bound, np.float64), expected.shape)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan, err_msg=f"{name}: NaN positions")
    infinite = np.isinf(expected)
    np.testing.assert_array_equal(actual[infinite], expected[infinite],
                                  err_msg=f"{name}: overflow")
    nan |= infinite
    if not expected.size or nan.all():
        return
    largest = max(np.abs(expected[~nan]).max(), 0 if scale is None else np.max(scale))
    widest = bound[~nan].max()
    assert largest == 0 or widest < largest, (
        f"{name}: the bound {widest:.3g} is as wide as the quantity it bounds ({largest:.3g}); "
        f"a zero result would pass")
    with np.errstate(invalid="ignore"):  # inf - inf where both overflowed, masked below
        error = np.abs(actual - expected)
    bad = ~nan & ~(error <= bound)
    if bad.any():
        worst = np.unravel_index(np.argmax(np.where(nan, -np.inf, error - bound)), error.shape)
        raise AssertionError(
            f"{name}: {bad.sum()} of {expected.size} values off by more than their bound; worst "
            f"at {tuple(int(i) for i in worst)}: got {actual[worst]!r}, expected "
            f"{expected[worst]!r}, error {error[worst]:.3g} > bound {bound[worst]:.3g}")


def overflowing(expected: Any, dtype: Any) -> np.ndarray:
    """The oracle's values, ``inf`` where they are beyond ``dtype``'s largest value by more than
    half its last ulp (the results stored in ``dtype`` overflow there)."""
    expected = np.asarray(expected, np.float64)
    with np.errstate(over="ignore"):
        overflow = np.isinf(expected.astype(dtype)) & np.isfinite(expected)
    return np.where(overflow, np.copysign(np.inf, expected), expected)


def _group_max(a: np.ndarray) -> np.ndarray:
    """Largest value of each group ``[i, g]`` of an ``(n, G, K, S)`` array, shape (n, G, 1, 1)."""
    return a.max(axis=(2, 3), keepdims=True) if a.size else np.zeros(a.shape[:2] + (1, 1))


def _sum_bound(terms: np.ndarray, axes: tuple[int, ...], uc: float) -> np.ndarray:
    """Bound of the rounding error of ``terms.sum(axes)``: ``C_SUM * uc * sqrt(n) * rms``."""
    return C_SUM * uc * np.sqrt(oracle.total(np.square(terms), axes, keepdims=True))


class Bounds:
    """Bounds of one forward pass over groups (and, via :meth:`backward`, its gradients).

    Parameters
    ----------
    x4 : ndarray
        The input as the ``(n, G, K, S)`` view, holding exactly the values of the input array.
    dtype : dtype
        The input's dtype (storage of the outputs ``y`` and ``dx``).
    weight, bias : ndarray, optional
        Affine parameters of shape ``(G, K)`` (any shape with ``G * K`` values).
    residual : ndarray, optional
        The fused residual as an ``(n, G, K, S)`` view.
    eps : float
        The normalization's eps.
    stats : (mean, var), optional
        Normalize with these ``(n, G)`` statistics (eval) instead of each group's own.
    """

    def __init__(self, x4: Any, dtype: Any, weight: Any = None, bias: Any = None,
                 residual: Any = None, eps: float = 1e-5, stats: Any = None) -> None:
        x4 = np.asarray(x4, np.float64)
        self.dtype = np.dtype(dtype)
        self.ud, self.uc, u64 = unit(dtype), unit(compute_dtype(dtype)), unit(np.float64)
        n, g, k, s = x4.shape
        self.m = k * s
        self.w4 = (np.ones((1, g, k, 1)) if weight is None
                   else np.asarray(weight, np.float64).reshape(1, g, k, 1))
        b4 = np.zeros((1, g, k, 1)) if bias is None else np.asarray(bias, np.float64).reshape(
            1, g, k, 1)
        if stats is None:
            mean, var = oracle.moments(x4, (2, 3), keepdims=True)
        else:
            mean, var = (np.asarray(v, np.float64).reshape(n, g, 1, 1) for v in stats)
        self.mean, self.var = mean, var
        sigma = np.sqrt(var)
        self.inv = 1.0 / np.sqrt(var + eps)
        self.xhat = (x4 - mean) * self.inv
        self.d_mean = C_ELEMENT * (self.uc * sigma + u64 * np.abs(mean))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel_var = C_ELEMENT * (self.uc + u64 * np.where(sigma > 0, np.abs(mean) / sigma, 0))
            if stats is None and self.m:
                squares = _sum_bound(np.square(x4 - mean), (2, 3), self.uc)
                rel_var = rel_var + np.where(var > 0, squares / (self.m * var), 0)
        self.d_var = rel_var * var
        self.rel_inv = 0.5 * self.d_var / (var + eps)
        terms = np.abs(self.xhat * self.w4) + np.abs(b4)
        if residual is not None:
            terms = terms + np.abs(np.asarray(residual, np.float64))
        pre = self.xhat * self.w4 + b4 + (0 if residual is None else residual)
        w_max = np.abs(self.w4).max(axis=2, keepdims=True)
        compute = (C_ELEMENT * self.uc * _group_max(terms)
                   + self.d_mean * self.inv * w_max
                   + self.rel_inv * _group_max(np.abs(self.xhat * self.w4)))
        #: bound of the output (a fused ReLU is 1-Lipschitz: the pre-activation's bound holds)
        self.y = self.ud * np.abs(pre) + (1 + self.ud) * compute + _tiny(dtype)
        #: the size of each result's terms, by name (see :func:`check`)
        self.scales = {"y": _group_max(terms)}
        #: bounds of the statistics as saved in the compute dtype, shape (n, G, 1, 1)
        self.saved_mean = self.d_mean + self.uc * np.abs(mean)
        self.saved_invstd = (self.rel_inv + self.uc) * self.inv

    def running(self, running_mean: Any, running_var: Any, momentum: float,
                mean_dtype: Any = None, var_dtype: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Bounds of the updated running statistics (batch norm, ``n == 1``), flat per channel;
        the dtypes default to the given arrays'."""
        count = self.m
        rm, rv = (np.asarray(v, np.float64).ravel() for v in (running_mean, running_var))
        mean, var = self.mean.ravel(), self.var.ravel()
        unbiased = count / (count - 1)
        # computed in the compute dtype at least, then rounded to the running statistics' dtype
        um = C_ELEMENT * self.uc + unit(mean_dtype or np.asarray(running_mean).dtype)
        uv = C_ELEMENT * self.uc + unit(var_dtype or np.asarray(running_var).dtype)
        return (momentum * self.d_mean.ravel() + um * (np.abs((1 - momentum) * rm)
                                                        + np.abs(momentum * mean)),
                momentum * unbiased * self.d_var.ravel()
                + uv * (np.abs((1 - momentum) * rv) + np.abs(momentum * unbiased * var)))

    def backward(self, dy4: Any, training: bool = True, grad_dtype: Any = None,
                 saved_mean: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bounds of ``dx`` (the ``(n, G, K, S)`` view) and of ``dweight``, ``dbias`` (flat per
        channel), for the gradient ``dy4`` (``(n, G, K, S)``).

        The backward pass is given the statistics as saved in the compute dtype (the functional
        API), or with ``saved_mean=False`` the mean unrounded (a layer keeps the float64 mean);
        ``grad_dtype``: dtype of ``dweight``/``dbias`` (the weight's, or the compute dtype).
        """
        dy4 = np.asarray(dy4, np.float64)
        uc, ud, inv, xhat, m = self.uc, self.ud, self.inv, self.xhat, max(self.m, 1)
        ug = unit(grad_dtype or compute_dtype(self.dtype))
        d_mean = self.d_mean + (uc * np.abs(self.mean) if saved_mean else 0)
        rel_inv = self.rel_inv + uc
        per_channel = (0, 3)
        db = oracle.total(dy4, per_channel, keepdims=True)
        dw = oracle.total(dy4 * xhat, per_channel, keepdims=True)
        group_dy = oracle.total(dy4, (3,), keepdims=True)  # (n, G, K, 1)
        group_dyx = oracle.total(dy4 * xhat, (3,), keepdims=True)
        tol_db = _sum_bound(dy4, per_channel, uc) + ug * np.abs(db)
        tol_dw = (_sum_bound(dy4 * xhat, per_channel, uc)
                  + oracle.total(d_mean * inv * np.abs(group_dy), (0,), keepdims=True)
                  + oracle.total(rel_inv * np.abs(group_dyx), (0,), keepdims=True)
                  + ug * np.abs(dw))
        g = dy4 * self.w4
        t1 = np.abs(inv * g)
        if training:
            sg = oracle.total(g, (2, 3), keepdims=True)
            sgx = oracle.total(g * xhat, (2, 3), keepdims=True)
            t2 = np.abs(inv * sg / m)
            t3 = np.abs(inv * xhat * sgx / m)
            x_max = _group_max(np.abs(xhat))
            dx = inv * (g - sg / m - xhat * sgx / m)
            compute = (C_ELEMENT * uc * _group_max(t1 + t2 + t3)
                       + inv * (_sum_bound(g, (2, 3), uc)
                                + x_max * _sum_bound(g * xhat, (2, 3), uc)) / m
                       + inv * d_mean * inv * (np.abs(sgx) + x_max * np.abs(sg)) / m
                       + rel_inv * (_group_max(t1) + t2 + 3 * _group_max(t3)))
        else:
            dx = inv * g
            compute = C_ELEMENT * uc * _group_max(t1) + rel_inv * _group_max(t1)
        tol_dx = ud * np.abs(dx) + (1 + ud) * compute + _tiny(self.dtype)
        self.scales.update(
            dx=_group_max(t1 + t2 + t3) if training else _group_max(t1),
            dw=np.sqrt(oracle.total(np.square(dy4 * xhat), per_channel)).ravel(),
            db=np.sqrt(oracle.total(np.square(dy4), per_channel)).ravel())
        return tol_dx, tol_dw.ravel(), tol_db.ravel()


def _tiny(dtype: Any) -> float:
    """Absolute rounding of results near zero: subnormal outputs, and flush-to-zero on GPUs."""
    return float(np.finfo(dtype).smallest_subnormal) + float(
        np.finfo(compute_dtype(dtype)).tiny)

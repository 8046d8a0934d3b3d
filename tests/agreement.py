"""Every public operation on one input, each result checked against the float64 oracle within
the bounds of :mod:`tests.tolerances`. Shared by the tests that drive the engines' paths at scale
(:mod:`tests.test_scale`) and the CUDA kernels' launch geometries (:mod:`tests.test_kernels`).

Each function takes the array module to compute with (NumPy or CuPy, or the emulator's stand-in)
and host arrays; it returns nothing and raises ``AssertionError`` naming the first result that is
out of its bound.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

import bncupy as bn
from tests import oracle
from tests.arrays import assign, to_numpy
from tests.tolerances import (
    C_ELEMENT,
    Bounds,
    channels,
    check,
    compute_dtype,
    overflowing,
    unit,
)

LAYERS = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d, 5: bn.BatchNorm3d}


def data(shape: tuple[int, ...], dtype: Any, seed: int, axis: int = 1, offset: float = 0.0,
         scale: float = 2.0) -> np.ndarray:
    """Normal data of ``scale`` around per-channel means drawn from ``[-offset, offset]``."""
    rng = np.random.default_rng(seed)
    bshape = [1] * len(shape)
    bshape[axis] = shape[axis]
    means = rng.uniform(-offset, offset, shape[axis]).reshape(bshape)
    return (rng.standard_normal(shape) * scale + means).astype(dtype)


def _host(a: Any) -> np.ndarray:
    return to_numpy(a).astype(np.float64)


LAYOUTS = ("contiguous", "channels moved", "reversed", "transposed", "offset", "strided")


def arrange(xp: Any, a: np.ndarray, layout: str, axis: int) -> Any:
    """``a``'s values in an array of ``xp`` whose memory is laid out as ``layout`` says:
    "channels moved" (channel-first logical axes in channels-last memory, or the reverse),
    "reversed" (a negative stride on the batch axis), "transposed" (batch and last non-channel
    axis swapped in memory), "offset" (contiguous, one element into its allocation) or
    "strided" (every other element of a larger array)."""
    a = np.asarray(a)
    if layout == "contiguous" or a.ndim == 0:
        return xp.asarray(a)
    if layout == "offset":
        flat = xp.zeros(a.size + 1, a.dtype)
        flat[1:] = xp.asarray(np.ascontiguousarray(a).ravel())
        return flat[1:].reshape(a.shape)
    if layout == "strided":
        buf = xp.zeros((*a.shape[:-1], 2 * a.shape[-1]), a.dtype)
        buf[..., ::2] = xp.asarray(a)
        return buf[..., ::2]
    if layout == "reversed":
        return xp.asarray(np.ascontiguousarray(a[::-1]))[::-1]
    channel = axis % a.ndim
    if layout == "channels moved":  # NCHW <-> NHWC memory, as torch's channels_last
        other = a.ndim - 1 if channel == 1 else 1
        return xp.moveaxis(xp.asarray(np.ascontiguousarray(np.moveaxis(a, channel, other))),
                           other, channel)
    other = max((i for i in range(a.ndim) if i != channel), default=0)  # transposed
    return xp.swapaxes(xp.asarray(np.ascontiguousarray(np.swapaxes(a, 0, other))), 0, other)


def parameters(c: int, dtype: Any, rng: np.random.Generator,
               dtypes: Any = None) -> tuple[np.ndarray, ...]:
    """weight, bias, running_mean, running_var of ``dtypes`` (default: the compute dtype of
    ``dtype`` data, as the layers keep them), values exactly representable in them."""
    pd = compute_dtype(dtype)
    wd, bd, md, vd = dtypes or (pd, pd, pd, pd)
    return (rng.uniform(0.5, 2, c).astype(wd), rng.standard_normal(c).astype(bd),
            rng.standard_normal(c).astype(md), rng.uniform(0.5, 2, c).astype(vd))


class Inputs:
    """One batch-norm problem: host values, and how they are put on the device under test."""

    def __init__(self, xp: Any, x: np.ndarray, axis: int, seed: int = 0, put: Any = None,
                 dtypes: Any = None) -> None:
        self.xp, self.x, self.axis = xp, x, axis
        self.dtype, self.c = x.dtype, x.shape[axis]
        rng = np.random.default_rng(seed)
        self.w, self.b, self.rm, self.rv = parameters(self.c, x.dtype, rng, dtypes)
        self.dy = rng.standard_normal(x.shape).astype(x.dtype)
        self.z = rng.standard_normal(x.shape).astype(x.dtype)
        self.put = put or xp.asarray
        self.xd, self.dyd, self.zd = self.put(x), self.put(self.dy), self.put(self.z)
        self.wd, self.bd = xp.asarray(self.w), xp.asarray(self.b)
        self.count = x.size // self.c if self.c else 0

    def view(self, a: Any) -> np.ndarray:
        return channels(a, self.axis)

    def running(self) -> tuple[Any, Any]:
        """Fresh device copies of the running statistics (NumPy's asarray would not copy)."""
        return self.xp.asarray(self.rm.copy()), self.xp.asarray(self.rv.copy())


def batch_norm(xp: Any, x: np.ndarray, axis: int, seed: int = 0, eps: float = 1e-5,
               momentum: float = 0.1, fused: bool = True, put: Any = None,
               dtypes: Any = None) -> None:
    """Every batch-norm operation on ``x`` (see :func:`train`, :func:`evaluate`,
    :func:`fused_layer`; ``fused`` includes the last two). ``put`` makes the input-shaped
    operands (default ``xp.asarray``), ``dtypes`` the parameters' dtypes (weight, bias, running
    mean, running var)."""
    case = Inputs(xp, x, axis, seed, put, dtypes)
    if case.count != 1:
        train(case, eps, momentum)
    if fused:
        evaluate(case, eps)
        if case.count > 1:
            fused_layer(case, eps)


def train(case: Inputs, eps: float = 1e-5, momentum: float = 0.1) -> None:
    """Training forward (output, saved statistics, running statistics), its backward and the
    statistics (``welford``, ``moments``); an empty batch gives empty outputs and NaN statistics
    and leaves the running statistics alone."""
    x, axis, view = case.x, case.axis, case.view
    rm, rv = case.running()
    y, save_mean, save_invstd = bn.batch_norm_forward(case.xd, rm, rv, case.wd, case.bd, True,
                                                      momentum, eps, axis=axis)
    assert y.shape == x.shape and y.dtype == x.dtype and type(y) is type(case.xd)
    dx, dw, db = bn.batch_norm_backward(case.dyd, case.xd, case.wd, save_mean, save_invstd,
                                        axis=axis)
    moments = bn.welford(case.xd, axis=axis)
    mean, var = bn.moments(case.xd, axis=axis)
    assert moments.count == case.count
    if case.count == 0:
        assert np.isnan(_host(save_mean)).all() and np.isnan(_host(save_invstd)).all()
        assert np.isnan(_host(mean)).all()
        np.testing.assert_array_equal(to_numpy(rm), case.rm)
        np.testing.assert_array_equal(to_numpy(rv), case.rv)
        assert dx.shape == x.shape and not _host(dw).any() and not _host(db).any()
        return
    ref_y, ref_mean, ref_invstd, ref_rm, ref_rv = oracle.forward(
        x, axis, case.w, case.b, eps, True, case.rm, case.rv, momentum)
    bound = Bounds(view(x), case.dtype, case.w, case.b, eps=eps)
    check(view(_host(y)), view(ref_y), bound.y, "y")
    check(_host(save_mean), ref_mean, bound.saved_mean.ravel(), "save_mean")
    check(_host(save_invstd), ref_invstd, bound.saved_invstd.ravel(), "save_invstd")
    bound_rm, bound_rv = bound.running(case.rm, case.rv, momentum)
    check(_host(rm), overflowing(ref_rm, case.rm.dtype), bound_rm, "running_mean")
    check(_host(rv), overflowing(ref_rv, case.rv.dtype), bound_rv, "running_var")

    ref_dx, ref_dw, ref_db = oracle.backward(case.dy, x, axis, case.w, eps)
    ref_dw, ref_db = overflowing(ref_dw, case.w.dtype), overflowing(ref_db, case.w.dtype)
    bound_dx, bound_dw, bound_db = bound.backward(view(case.dy), grad_dtype=case.w.dtype)
    check(view(_host(dx)), view(ref_dx), bound_dx, "dx",
          bound.scales["dx"])
    check(_host(dw), ref_dw, bound_dw, "dw", bound.scales["dw"])
    check(_host(db), ref_db, bound_db, "db", bound.scales["db"])

    ref_var = bound.var.ravel()  # the oracle's
    bound_var = (bound.d_var + bound.uc * bound.var).ravel()
    check(_host(moments.mean), ref_mean, bound.saved_mean.ravel(), "welford mean")
    check(_host(moments.m2), ref_var * case.count, bound_var * case.count, "welford m2")
    check(_host(mean), ref_mean, bound.saved_mean.ravel(), "moments mean")
    check(_host(var), ref_var, bound_var, "moments var")


def evaluate(case: Inputs, eps: float = 1e-5) -> None:
    """Eval forward with a fused ReLU and residual, and eval backward, with the running
    statistics; they are left as they were."""
    x, axis, view = case.x, case.axis, case.view
    rm, rv = case.running()
    y, mean, invstd = bn.batch_norm_forward(case.xd, rm, rv, case.wd, case.bd, False, eps=eps,
                                            axis=axis, activation="relu", residual=case.zd)
    np.testing.assert_array_equal(to_numpy(rm), case.rm)
    np.testing.assert_array_equal(to_numpy(rv), case.rv)
    dx, dw, db = bn.batch_norm_backward(case.dyd, case.xd, case.wd, mean, invstd,
                                        training=False, axis=axis)
    if case.count == 0:
        assert y.shape == dx.shape == x.shape and not _host(dw).any() and not _host(db).any()
        return
    running = (case.rm, case.rv)
    ref_pre = oracle.forward(x, axis, case.w, case.b, eps, False, *running)[0] + case.z
    bound = Bounds(view(x), case.dtype, case.w, case.b, residual=view(case.z), eps=eps,
                   stats=running)
    check(view(_host(y)), view(overflowing(np.maximum(ref_pre, 0), case.dtype)), bound.y,
          "eval y (relu, residual)")
    ref_dx, ref_dw, ref_db = oracle.backward(case.dy, x, axis, case.w, eps, False, *running)
    ref_dw, ref_db = overflowing(ref_dw, case.w.dtype), overflowing(ref_db, case.w.dtype)
    ref_dx = overflowing(ref_dx, case.dtype)
    bound_dx, bound_dw, bound_db = bound.backward(view(case.dy), training=False,
                                                  grad_dtype=case.w.dtype)
    check(view(_host(dx)), view(ref_dx), bound_dx, "eval dx",
          bound.scales["dx"])
    check(_host(dw), ref_dw, bound_dw, "eval dw", bound.scales["dw"])
    check(_host(db), ref_db, bound_db, "eval db", bound.scales["db"])


def fused_layer(case: Inputs, eps: float = 1e-5) -> None:
    """A layer with a fused ReLU, called with a residual: output, and its backward
    (``grad_residual``, ``grad_weight``, ``grad_bias`` included)."""
    x, axis, view = case.x, case.axis, case.view
    w, b = case.w.astype(compute_dtype(case.dtype)), case.b.astype(compute_dtype(case.dtype))
    layer = LAYERS[x.ndim](case.c, eps=eps, dtype=w.dtype, activation="relu",
                           channels_last=axis % x.ndim == x.ndim - 1 and x.ndim > 2)
    assign(layer.weight, w)
    assign(layer.bias, b)
    y = _host(layer(case.xd, residual=case.zd))
    ref_pre = oracle.forward(x, axis, w, b, eps)[0] + case.z
    bound = Bounds(view(x), case.dtype, w, b, residual=view(case.z), eps=eps)
    check(view(y), view(np.maximum(ref_pre, 0)), bound.y, "fused layer y")
    # The backward pass masks with the forward output's sign; the oracle agrees with that sign
    # wherever the pre-activation is further from 0 than its bound.
    mask = y > 0
    assert ((view(mask) == (view(ref_pre) > 0)) | (np.abs(view(ref_pre)) <= bound.y)).all()
    g = case.dy * mask.astype(case.dtype)
    dx = layer.backward(case.dyd)
    np.testing.assert_array_equal(to_numpy(layer.grad_residual), g, err_msg="grad_residual")
    ref_dx, ref_dw, ref_db = oracle.backward(g, x, axis, w, eps)
    # the layer's backward pass uses the batch mean as it has it, unrounded
    bound_dx, bound_dw, bound_db = bound.backward(view(g), grad_dtype=w.dtype, saved_mean=False)
    check(view(_host(dx)), view(ref_dx), bound_dx, "fused layer dx",
          bound.scales["dx"])
    check(_host(layer.grad_weight), ref_dw, bound_dw, "fused layer grad_weight",
          bound.scales["dw"])
    check(_host(layer.grad_bias), ref_db, bound_db, "fused layer grad_bias", bound.scales["db"])


def batch_renorm(xp: Any, x: np.ndarray, axis: int, seed: int = 0, rmax: float = 1.5,
                 dmax: float = 0.5, eps: float = 1e-5, momentum: float = 0.1,
                 put: Any = None) -> None:
    """Batch renormalization's training forward (output, r, d, running statistics) and backward,
    with running statistics that clip ``r`` and ``d`` on some channels and not on others."""
    dtype, c = x.dtype, x.shape[axis]
    pd = compute_dtype(dtype)
    put = put or xp.asarray
    rng = np.random.default_rng(seed)
    w, b = rng.uniform(0.5, 2, c).astype(pd), rng.standard_normal(c).astype(pd)
    mean, var = oracle.moments(x, tuple(i for i in range(x.ndim) if i != axis % x.ndim))
    rm0 = (mean + rng.uniform(-1, 1, c) * np.sqrt(var)).astype(pd)
    rv0 = (var * rng.uniform(0.3, 3, c) + 0.1).astype(pd)
    dy = rng.standard_normal(x.shape).astype(dtype)
    rm, rv = xp.asarray(rm0.copy()), xp.asarray(rv0.copy())
    xd, wd = put(x), xp.asarray(w)
    y, save_mean, save_invstd, r, d = bn.batch_renorm_forward(
        xd, rm, rv, wd, xp.asarray(b), True, momentum, eps, rmax=rmax, dmax=dmax, axis=axis)
    ref_y, ref_r, ref_d, ref_rm, ref_rv, ref_dx, ref_dw, ref_db = oracle.batch_renorm(
        x, dy, axis, w, b, rm0, rv0, eps, rmax, dmax, momentum)
    view = partial(channels, axis=axis)
    # y = xhat * (w r) + (w d + b): batch norm's bounds with that affine map, plus the errors
    # of r (the batch sigma's, relatively) and d (the mean's, over the running sigma); clipping
    # only narrows them.
    bound = Bounds(view(x), dtype, w * ref_r, w * ref_d + b, eps=eps)
    running_inv = 1 / np.sqrt(rv0.astype(np.float64) + eps)
    d_r = np.abs(ref_r) * (bound.rel_inv.ravel() + bound.uc)
    d_d = ((bound.d_mean.ravel() + C_ELEMENT * unit(np.float64) * (np.abs(mean) + np.abs(rm0)))
           * running_inv + bound.uc * np.abs(ref_d))
    xhat_w = np.abs(bound.xhat * bound.w4 / ref_r.reshape(1, -1, 1, 1)).max(axis=(0, 2, 3))
    extra = (xhat_w * d_r + np.abs(w) * d_d).reshape(1, -1, 1, 1)
    check(view(_host(y)), view(ref_y), bound.y + extra, "renorm y")
    check(_host(r), ref_r, d_r, "renorm r")
    check(_host(d), ref_d, d_d, "renorm d")
    bound_rm, bound_rv = bound.running(rm0, rv0, momentum)
    check(_host(rm), ref_rm, bound_rm, "renorm running_mean")
    check(_host(rv), ref_rv, bound_rv, "renorm running_var")
    dx, dw, db = bn.batch_renorm_backward(put(dy), xd, wd, save_mean, save_invstd, r, d,
                                          axis=axis)
    # batch norm's backward with the weight w r; grad_weight = r sum(dy xhat) + d sum(dy)
    bound_dx, bound_dw0, bound_db = bound.backward(view(dy), grad_dtype=pd)
    dw0 = (ref_dw - ref_d * ref_db) / ref_r
    bound_dw = (np.abs(ref_r) * bound_dw0 + np.abs(ref_d) * bound_db + d_r * np.abs(dw0)
                + d_d * np.abs(ref_db) + unit(pd) * np.abs(ref_dw))
    check(view(_host(dx)), view(ref_dx),
          bound_dx + np.abs(view(ref_dx)) * (d_r / ref_r).reshape(1, -1, 1, 1), "renorm dx",
          bound.scales["dx"])
    check(_host(dw), ref_dw, bound_dw, "renorm dw", bound.scales["dw"])
    check(_host(db), ref_db, bound_db, "renorm db", bound.scales["db"])


def ghost_batch_norm(xp: Any, x: np.ndarray, axis: int, size: int, seed: int = 0,
                     eps: float = 1e-5) -> None:
    """A ghost batch-norm layer's training forward, backward and running statistics: plain batch
    norm per virtual batch of ``size`` samples, counted in order."""
    dtype, c = x.dtype, x.shape[axis]
    pd = compute_dtype(dtype)
    rng = np.random.default_rng(seed)
    w, b = rng.uniform(0.5, 2, c).astype(pd), rng.standard_normal(c).astype(pd)
    dy = rng.standard_normal(x.shape).astype(dtype)
    layer = LAYERS[x.ndim](c, eps=eps, dtype=pd, ghost_batch_size=size,
                           channels_last=axis % x.ndim == x.ndim - 1 and x.ndim > 2)
    assign(layer.weight, w)
    assign(layer.bias, b)
    y = _host(layer(xp.asarray(x)))
    dx = _host(layer.backward(xp.asarray(dy)))
    rm, rv = np.zeros(c), np.ones(c)
    dw, db = np.zeros(c), np.zeros(c)
    bound_rm, bound_rv, bound_dw, bound_db = (np.zeros(c) for _ in range(4))
    view = partial(channels, axis=axis)
    for start in range(0, x.shape[0], size):
        part = slice(start, start + size)
        ref_y, _, _, new_rm, new_rv = oracle.forward(x[part], axis, w, b, eps, True, rm, rv)
        ref_dx, ref_dw, ref_db = oracle.backward(dy[part], x[part], axis, w, eps)
        bound = Bounds(view(x[part]), dtype, w, b, eps=eps)
        check(view(y[part]), view(ref_y), bound.y, f"ghost y[{part.start}:]")
        part_dx, part_dw, part_db = bound.backward(view(dy[part]), grad_dtype=pd)
        check(view(dx[part]), view(ref_dx), part_dx, f"ghost dx[{part.start}:]",
          bound.scales["dx"])
        step_rm, step_rv = bound.running(rm, rv, 0.1, pd, pd)
        bound_rm, bound_rv = 0.9 * bound_rm + step_rm, 0.9 * bound_rv + step_rv
        bound_dw, bound_db = bound_dw + part_dw, bound_db + part_db
        rm, rv, dw, db = new_rm, new_rv, dw + ref_dw, db + ref_db
    check(_host(layer.grad_weight), dw, bound_dw, "ghost grad_weight")
    check(_host(layer.grad_bias), db, bound_db, "ghost grad_bias")
    check(_host(layer.running_mean), rm, bound_rm, "ghost running_mean")
    check(_host(layer.running_var), rv, bound_rv, "ghost running_var")
    assert int(layer.num_batches_tracked) == -(-x.shape[0] // size)


def groups(a: Any, kind: str, count: int) -> np.ndarray:
    """The oracle's ``(n, G, K, S)`` float64 view of a normalization over groups: rows of the
    trailing ``count`` axes (layer norm, ``kind`` "rows"), or ``count`` groups of channels of
    ``(N, C, *)`` ("cf") or ``(N, *, C)`` ("cl") data."""
    a = np.asarray(a, np.float64)
    if kind == "rows":
        lead = a.shape[:a.ndim - count]
        return a.reshape(int(np.prod(lead, dtype=int)), 1, -1, 1)
    if kind == "cl":
        a = np.moveaxis(a, -1, 1)
    return np.ascontiguousarray(a).reshape(a.shape[0], count, a.shape[1] // count, -1)


def family(xp: Any, which: str, x: np.ndarray, seed: int = 0, eps: float = 1e-5,
           normalized: int = 1, num_groups: int = 2) -> None:
    """Layer norm over the trailing ``normalized`` axes (``which`` "layer"), group norm in
    ``num_groups`` groups or instance norm, channels first ("group-cf", "instance-cf") or last
    ("-cl"): forward (output, saved statistics) and backward against the oracle."""
    dtype = x.dtype
    pd = compute_dtype(dtype)
    rng = np.random.default_rng(seed)
    kind = "rows" if which == "layer" else which.split("-")[1]
    axis = -1 if kind == "cl" else 1
    if which == "layer":
        shape = x.shape[x.ndim - normalized:]
        count = normalized
    else:
        shape = (x.shape[axis],)
        count = x.shape[axis] if which.startswith("instance") else num_groups
    w = rng.uniform(0.5, 2, shape).astype(pd)
    b = rng.standard_normal(shape).astype(pd)
    dy = rng.standard_normal(x.shape).astype(dtype)
    xd, dyd, wd, bd = (xp.asarray(a) for a in (x, dy, w, b))
    if which == "layer":
        y, mean, rstd = bn.layer_norm_forward(xd, shape, wd, bd, eps)
        dx, dw, db = bn.layer_norm_backward(dyd, xd, shape, mean, rstd, wd)
    elif which.startswith("group"):
        y, mean, rstd = bn.group_norm_forward(xd, num_groups, wd, bd, eps, axis=axis)
        dx, dw, db = bn.group_norm_backward(dyd, xd, num_groups, mean, rstd, wd, axis=axis)
    else:
        y, mean, rstd = bn.instance_norm_forward(xd, None, None, wd, bd, eps=eps, axis=axis)
        dx, dw, db = bn.instance_norm_backward(dyd, xd, mean, rstd, wd, axis=axis)
    x4, dy4 = groups(x, kind, count), groups(dy, kind, count)
    ref_y, (ref_dx, ref_dw, ref_db) = oracle.grouped(x4, dy4, w, b, eps)
    ref_mean, ref_var = oracle.moments(x4, (2, 3))
    bound = Bounds(x4, dtype, w, b, eps=eps)
    check(groups(_host(y), kind, count), ref_y, bound.y, f"{which} y")
    check(_host(mean).ravel(), ref_mean.ravel(), bound.saved_mean.ravel(), f"{which} mean")
    check(_host(rstd).ravel(), (1 / np.sqrt(ref_var + eps)).ravel(),
          bound.saved_invstd.ravel(), f"{which} rstd")
    bound_dx, bound_dw, bound_db = bound.backward(dy4, grad_dtype=pd)
    check(groups(_host(dx), kind, count), ref_dx, bound_dx, f"{which} dx", bound.scales["dx"])
    check(_host(dw).ravel(), ref_dw.ravel(), bound_dw, f"{which} dw", bound.scales["dw"])
    check(_host(db).ravel(), ref_db.ravel(), bound_db, f"{which} db", bound.scales["db"])

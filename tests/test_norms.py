"""LayerNorm, GroupNorm, InstanceNorm on every backend against an independent float64 oracle;
gradients against finite differences; the numerics bar; the layers' torch semantics."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bncupy as bn
from tests import agreement, oracle
from tests.arrays import to_numpy
from tests.tolerances import Bounds, channels, check, compute_dtype

DTYPES = [np.float16, np.float32, np.float64]


def _pd(dtype):
    return compute_dtype(dtype).type


def _data(shape, dtype, seed, offset=0.0, scale=2.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + offset).astype(dtype)


LAYOUTS = ["contiguous", "reversed", "offset", "strided"]


@st.composite
def ln_cases(draw):
    k = draw(st.integers(1, 3))
    lead = [draw(st.integers(1, 5)) for _ in range(draw(st.integers(1, 2)))]
    return {"shape": (*lead, *[draw(st.integers(1, 9)) for _ in range(k)]), "k": k,
            "dtype": draw(st.sampled_from(DTYPES)), "seed": draw(st.integers(0, 2**32 - 1)),
            "offset": draw(st.sampled_from([0.0, 30.0, 1e3])), "affine": draw(st.booleans()),
            "layout": draw(st.sampled_from(LAYOUTS))}


@st.composite
def gn_cases(draw):
    n, g, k = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    spatial = [draw(st.integers(1, 5)) for _ in range(draw(st.integers(1, 3)))]
    axis = draw(st.sampled_from([1, -1]))
    shape = (n, g * k, *spatial) if axis == 1 else (n, *spatial, g * k)
    return {"shape": shape, "groups": g, "c": g * k, "axis": axis,
            "dtype": draw(st.sampled_from(DTYPES)), "seed": draw(st.integers(0, 2**32 - 1)),
            "offset": draw(st.sampled_from([0.0, 30.0, 1e3])), "affine": draw(st.booleans()),
            "layout": draw(st.sampled_from(LAYOUTS))}


def _params(shape, dtype, seed, affine):
    if not affine:
        return None, None
    return _data(shape, _pd(dtype), seed + 2, 1.0, 0.5), _data(shape, _pd(dtype), seed + 3)


def _compare(backend, x, dy, w, b, kind, groups, outputs, names):
    """``outputs`` (y, mean, rstd, dx, dw, db) against the oracle on the (n, G, K, S) view."""
    x4, dy4 = agreement.groups(x, kind, groups), agreement.groups(dy, kind, groups)
    ref_y, (ref_dx, ref_dw, ref_db) = oracle.grouped(x4, dy4, w, b)
    ref_mean, ref_var = oracle.moments(x4, (2, 3))
    bound = Bounds(x4, x.dtype, w, b)
    bound_dx, bound_dw, bound_db = bound.backward(dy4)
    y, mean, rstd, dx, dw, db = (to_numpy(a).astype(np.float64) for a in outputs)
    check(agreement.groups(y, kind, groups), ref_y, bound.y, names[0])
    check(mean.ravel(), ref_mean.ravel(), bound.saved_mean.ravel(), names[1])
    check(rstd.ravel(), (1 / np.sqrt(ref_var + 1e-5)).ravel(), bound.saved_invstd.ravel(),
          names[2])
    check(agreement.groups(dx, kind, groups), ref_dx, bound_dx, names[3], bound.scales["dx"])
    check(dw.ravel(), ref_dw.ravel(), bound_dw, names[4], bound.scales["dw"])
    check(db.ravel(), ref_db.ravel(), bound_db, names[5], bound.scales["db"])


@given(case=ln_cases())
def test_layer_norm_matches_oracle(backend, case):
    shape, k, dtype = case["shape"], case["k"], case["dtype"]
    ns = shape[len(shape) - k:]
    x, dy = _data(shape, dtype, case["seed"], case["offset"]), _data(shape, dtype, case["seed"] + 1)
    w, b = _params(ns, dtype, case["seed"], case["affine"])
    arrange = partial(agreement.arrange, backend.xp, layout=case["layout"], axis=-1)
    dev = [arrange(x), arrange(dy)] + [None if a is None else backend.asarray(a) for a in (w, b)]
    y, mean, rstd = bn.layer_norm_forward(dev[0], ns, dev[2], dev[3])
    assert y.dtype == x.dtype and y.shape == x.shape and type(y) is type(dev[0])
    assert mean.shape == rstd.shape == shape[:len(shape) - k]
    dx, dw, db = bn.layer_norm_backward(dev[1], dev[0], ns, mean, rstd, dev[2])
    assert dw.shape == db.shape == ns
    _compare(backend, x, dy, w, b, "rows", k, (y, mean, rstd, dx, dw, db),
             ("y", "mean", "rstd", "dx", "dw", "db"))


@given(case=gn_cases(), instance=st.booleans())
def test_group_and_instance_norm_match_oracle(backend, case, instance):
    shape, dtype, axis = case["shape"], case["dtype"], case["axis"]
    groups = case["c"] if instance else case["groups"]
    x, dy = _data(shape, dtype, case["seed"], case["offset"]), _data(shape, dtype, case["seed"] + 1)
    w, b = _params((case["c"],), dtype, case["seed"], case["affine"])
    arrange = partial(agreement.arrange, backend.xp, layout=case["layout"], axis=axis)
    dev = [arrange(x), arrange(dy)] + [None if a is None else backend.asarray(a) for a in (w, b)]
    spatial = x.size // (shape[0] * case["c"])
    if instance and spatial < 2:
        with pytest.raises(ValueError, match="more than 1 spatial element"):
            bn.instance_norm(dev[0], weight=dev[2], bias=dev[3], axis=axis)
        return
    if instance:
        y, mean, rstd = bn.instance_norm_forward(dev[0], None, None, dev[2], dev[3], axis=axis)
        dx, dw, db = bn.instance_norm_backward(dev[1], dev[0], mean, rstd, dev[2], axis=axis)
    else:
        y, mean, rstd = bn.group_norm_forward(dev[0], groups, dev[2], dev[3], axis=axis)
        dx, dw, db = bn.group_norm_backward(dev[1], dev[0], groups, mean, rstd, dev[2], axis=axis)
    assert mean.shape == (shape[0], groups) and y.shape == x.shape and y.dtype == x.dtype
    _compare(backend, x, dy, w, b, "cf" if axis == 1 else "cl", groups,
             (y, mean, rstd, dx, dw, db), ("y", "mean", "rstd", "dx", "dw", "db"))


@pytest.mark.parametrize("which", ["layer", "group", "instance"])
def test_gradients_match_finite_differences_in_float64(backend, which):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 5)) * 2 + 1
    probe, direction = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    w, b = rng.uniform(0.5, 2, 4 if which != "layer" else 5), rng.standard_normal(
        4 if which != "layer" else 5)
    run = {"layer": lambda xv, wv: bn.layer_norm_forward(xv, 5, wv, backend.asarray(b)),
           "group": lambda xv, wv: bn.group_norm_forward(xv, 2, wv, backend.asarray(b)),
           "instance": lambda xv, wv: bn.instance_norm_forward(xv, None, None, wv,
                                                               backend.asarray(b))}[which]

    def loss(xv, wv=w):
        return float((backend.to_numpy(run(backend.asarray(xv), backend.asarray(wv))[0])
                      * probe).sum())

    _, mean, rstd = run(backend.asarray(x), backend.asarray(w))
    wd, pd_, xd = backend.asarray(w), backend.asarray(probe), backend.asarray(x)
    dx, dw, _ = {"layer": lambda: bn.layer_norm_backward(pd_, xd, 5, mean, rstd, wd),
                 "group": lambda: bn.group_norm_backward(pd_, xd, 2, mean, rstd, wd),
                 "instance": lambda: bn.instance_norm_backward(pd_, xd, mean, rstd, wd)}[which]()
    numeric = oracle.numerical_gradient(loss, x, direction)
    assert numeric == pytest.approx(float((backend.to_numpy(dx) * direction).sum()),
                                    rel=1e-5, abs=1e-6)
    e = np.zeros_like(w)
    e[1] = 1.0
    numeric_w = oracle.numerical_gradient(lambda wv: loss(x, wv), w, e)
    assert numeric_w == pytest.approx(float(backend.to_numpy(dw)[1]), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("offset", [1e3, 1e5, 1e6])
@pytest.mark.parametrize("which", ["layer", "group-cf", "group-cl"])
def test_float32_offsets_keep_variance_and_output_precision(backend, which, offset):
    rng = np.random.default_rng(1)
    if which == "layer":
        x = rng.standard_normal((16, 300)) + rng.uniform(-offset, offset, (16, 1))
        axes, call = (1,), lambda a: bn.layer_norm_forward(a, 300)
    else:
        x = rng.standard_normal((4, 6, 12, 12)) + rng.uniform(-offset, offset, (4, 6, 1, 1))
        axes, call = (2, 3), lambda a: bn.instance_norm_forward(a)
        if which == "group-cl":
            x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
            axes, call = (1, 2), lambda a: bn.instance_norm_forward(a, axis=-1)
    x = x.astype(np.float32)
    x64 = x.astype(np.float64)
    truth = x64.var(axis=axes)
    y, _, rstd = call(backend.asarray(x))
    var = 1.0 / backend.to_numpy(rstd).astype(np.float64) ** 2 - 1e-5
    assert np.abs(var.reshape(truth.shape) / truth - 1).max() <= 1e-5
    kind, count = ("rows", 1) if which == "layer" else (which[-2:], 6)
    x4 = agreement.groups(x, kind, count)
    check(agreement.groups(backend.to_numpy(y), kind, count), oracle.grouped(x4, x4)[0],
          Bounds(x4, x.dtype).y, "y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [0.0, 1.0, -37.25, 0.1, 1 / 3, 6e4])
def test_constant_groups_give_exactly_beta(backend, dtype, value):
    beta = np.array([0.5, -2.0, 3.25], _pd(dtype))
    gamma = np.array([1.5, 2.0, -1.0], _pd(dtype))
    x = np.full((2, 3, 4, 5), value, dtype)
    y = bn.group_norm(backend.asarray(x), 3, backend.asarray(gamma), backend.asarray(beta))
    expected = np.broadcast_to(beta.reshape(1, 3, 1, 1), x.shape).astype(dtype)
    np.testing.assert_array_equal(backend.to_numpy(y), expected)
    xl = np.full((2, 7, 3), value, dtype)
    y = bn.layer_norm(backend.asarray(xl), 3, backend.asarray(gamma), backend.asarray(beta))
    np.testing.assert_array_equal(backend.to_numpy(y),
                                  np.broadcast_to(beta, xl.shape).astype(dtype))


def test_layers_follow_torch_semantics(backend):
    xp = backend.xp
    x = xp.asarray(_data((4, 6, 5, 5), np.float32, 0, 3.0))
    layer = bn.InstanceNorm2d(6, affine=True, track_running_stats=True)
    assert list(layer.state_dict()) == ["weight", "bias", "running_mean", "running_var",
                                        "num_batches_tracked"]
    layer(x)
    assert int(layer.num_batches_tracked) == 0  # torch never counts instance-norm batches
    rm = to_numpy(layer.running_mean)
    expected = 0.1 * to_numpy(x).astype(np.float64).mean(axis=(2, 3)).mean(axis=0)
    np.testing.assert_allclose(rm, expected, rtol=1e-5)
    layer.eval()
    y = to_numpy(layer(x))  # running statistics
    stats = (rm, to_numpy(layer.running_var))
    weight, bias = to_numpy(layer.weight), to_numpy(layer.bias)
    ref = oracle.forward(to_numpy(x), 1, weight, bias, 1e-5, False, *stats)[0]
    check(channels(y, 1), channels(ref, 1),
          Bounds(channels(to_numpy(x), 1), np.float32, weight, bias, stats=stats).y, "eval y")
    unbatched = bn.InstanceNorm1d(6)(x[0, :, :, 0])
    assert unbatched.shape == (6, 5)
    assert repr(bn.GroupNorm(2, 6)) == "GroupNorm(2, 6, eps=1e-05, affine=True, bias=True)"
    assert repr(bn.LayerNorm((3, 4), bias=False)) == \
        "LayerNorm((3, 4), eps=1e-05, elementwise_affine=True, bias=False)"
    assert list(bn.LayerNorm(4, bias=False).state_dict()) == ["weight"]
    assert list(bn.GroupNorm(2, 6, affine=False).state_dict()) == []
    assert bn.LayerNorm(4).weight.dtype == np.float32


@pytest.mark.parametrize("layer, shape", [
    (lambda: bn.LayerNorm((5, 5)), (4, 6, 5, 5)), (lambda: bn.GroupNorm(3, 6), (4, 6, 5, 5)),
    (lambda: bn.GroupNorm(3, 6, channels_last=True), (4, 5, 5, 6)),
    (lambda: bn.InstanceNorm3d(6, affine=True), (2, 6, 3, 4, 5)),
])
def test_layer_backward_matches_functional(backend, layer, shape):
    lay = layer()
    x = backend.asarray(_data(shape, np.float32, 3, 1.0))
    dy = backend.asarray(_data(shape, np.float32, 4))
    y = lay(x)
    dx = lay.backward(dy)
    assert type(dx) is type(x) and dx.shape == x.shape and lay.grad_weight.shape == \
        lay.weight.shape
    kind = "rows" if isinstance(lay, bn.LayerNorm) else (
        "cl" if getattr(lay, "channels_last", False) else "cf")
    groups = 2 if kind == "rows" else getattr(lay, "num_groups", 6)
    x4, dy4 = (agreement.groups(backend.to_numpy(a), kind, groups) for a in (x, dy))
    weight = backend.to_numpy(lay.weight)
    ref_y, (ref_dx, ref_dw, ref_db) = oracle.grouped(x4, dy4, weight)
    bound = Bounds(x4, np.float32, weight)
    bound_dx, bound_dw, bound_db = bound.backward(dy4)
    check(agreement.groups(backend.to_numpy(y), kind, groups), ref_y, bound.y, "y")
    check(agreement.groups(backend.to_numpy(dx), kind, groups), ref_dx, bound_dx, "dx",
          bound.scales["dx"])
    check(backend.to_numpy(lay.grad_weight).ravel(), ref_dw.ravel(), bound_dw, "grad_weight",
          bound.scales["dw"])
    check(backend.to_numpy(lay.grad_bias).ravel(), ref_db.ravel(), bound_db, "grad_bias",
          bound.scales["db"])

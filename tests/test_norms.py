"""LayerNorm, GroupNorm, InstanceNorm on every backend against an independent float64 oracle;
gradients against finite differences; the numerics bar; the layers' torch semantics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bncupy as bn
from tests import oracle
from tests.arrays import to_numpy
from tests.test_properties import TOL

DTYPES = [np.float16, np.float32, np.float64]


def _pd(dtype):
    return np.float64 if dtype == np.float64 else np.float32


def _data(shape, dtype, seed, offset=0.0, scale=2.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + offset).astype(dtype)


def _as4(a, kind, groups=1):
    """The (n, G, K, S) view the oracle takes: LayerNorm rows of the last ``groups`` axes
    (``kind`` "ln"), or channel groups of (N, C, *) / (N, *, C) data ("cf" / "cl")."""
    a = np.asarray(a, np.float64)
    if kind == "ln":
        lead = a.shape[:a.ndim - groups]
        return a.reshape(int(np.prod(lead, dtype=int)), 1, -1, 1)
    if kind == "cl":
        a = np.moveaxis(a, -1, 1)
    return a.reshape(a.shape[0], groups, a.shape[1] // groups, -1)


def _oracle(x, dy, w, b, kind, groups, eps=1e-5):
    y4, (dx4, dw, db) = oracle.grouped(_as4(x, kind, groups), _as4(dy, kind, groups), w, b, eps)
    shape = x.shape if kind != "cl" else (x.shape[0], x.shape[-1], *x.shape[1:-1])
    y, dx = y4.reshape(shape), dx4.reshape(shape)
    if kind == "cl":
        y, dx = np.moveaxis(y, 1, -1), np.moveaxis(dx, 1, -1)
    return y, dx, dw.reshape(-1), db.reshape(-1)


def _close(actual, expected, dtype, scale=1.0):
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol,
                               atol=atol * scale)


@st.composite
def ln_cases(draw):
    k = draw(st.integers(1, 3))
    lead = [draw(st.integers(1, 5)) for _ in range(draw(st.integers(1, 2)))]
    return {"shape": (*lead, *[draw(st.integers(1, 9)) for _ in range(k)]), "k": k,
            "dtype": draw(st.sampled_from(DTYPES)), "seed": draw(st.integers(0, 2**32 - 1)),
            "offset": draw(st.sampled_from([0.0, 30.0])), "affine": draw(st.booleans())}


@st.composite
def gn_cases(draw):
    n, g, k = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    spatial = [draw(st.integers(1, 5)) for _ in range(draw(st.integers(1, 3)))]
    axis = draw(st.sampled_from([1, -1]))
    shape = (n, g * k, *spatial) if axis == 1 else (n, *spatial, g * k)
    return {"shape": shape, "groups": g, "c": g * k, "axis": axis,
            "dtype": draw(st.sampled_from(DTYPES)), "seed": draw(st.integers(0, 2**32 - 1)),
            "offset": draw(st.sampled_from([0.0, 30.0])), "affine": draw(st.booleans())}


def _params(shape, dtype, seed, affine):
    if not affine:
        return None, None
    return _data(shape, _pd(dtype), seed + 2, 1.0, 0.5), _data(shape, _pd(dtype), seed + 3)


@given(case=ln_cases())
def test_layer_norm_matches_oracle(backend, case):
    shape, k, dtype = case["shape"], case["k"], case["dtype"]
    ns = shape[len(shape) - k:]
    x, dy = _data(shape, dtype, case["seed"], case["offset"]), _data(shape, dtype, case["seed"] + 1)
    w, b = _params(ns, dtype, case["seed"], case["affine"])
    dev = [None if a is None else backend.asarray(a) for a in (x, dy, w, b)]
    y, mean, rstd = bn.layer_norm_forward(dev[0], ns, dev[2], dev[3])
    assert y.dtype == x.dtype and y.shape == x.shape and type(y) is type(dev[0])
    assert mean.shape == rstd.shape == shape[:len(shape) - k]
    dx, dw, db = bn.layer_norm_backward(dev[1], dev[0], ns, mean, rstd, dev[2])
    assert dw.shape == db.shape == ns
    ref_y, ref_dx, ref_dw, ref_db = _oracle(x, dy, w, b, "ln", k)
    rows = x.size // int(np.prod(ns))
    _close(backend.to_numpy(y), ref_y, dtype, scale=4)
    _close(backend.to_numpy(dx), ref_dx, dtype, scale=16)
    _close(backend.to_numpy(dw).ravel(), ref_dw, dtype, scale=8 * rows)
    _close(backend.to_numpy(db).ravel(), ref_db, dtype, scale=4 * rows)


@given(case=gn_cases(), instance=st.booleans())
def test_group_and_instance_norm_match_oracle(backend, case, instance):
    shape, dtype, axis = case["shape"], case["dtype"], case["axis"]
    groups = case["c"] if instance else case["groups"]
    x, dy = _data(shape, dtype, case["seed"], case["offset"]), _data(shape, dtype, case["seed"] + 1)
    w, b = _params((case["c"],), dtype, case["seed"], case["affine"])
    dev = [None if a is None else backend.asarray(a) for a in (x, dy, w, b)]
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
    ref_y, ref_dx, ref_dw, ref_db = _oracle(x, dy, w, b, "cf" if axis == 1 else "cl", groups)
    _close(backend.to_numpy(y), ref_y, dtype, scale=4)
    _close(backend.to_numpy(dx), ref_dx, dtype, scale=16)
    _close(backend.to_numpy(dw), ref_dw, dtype, scale=8 * x.size)
    _close(backend.to_numpy(db), ref_db, dtype, scale=4 * x.size)


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
    ref = (x64 - x64.mean(axis=axes, keepdims=True)) / np.sqrt(truth.reshape(
        x64.mean(axis=axes, keepdims=True).shape) + 1e-5)
    np.testing.assert_allclose(backend.to_numpy(y), ref, atol=2e-5)


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
    ref = bn.batch_norm(to_numpy(x), rm, to_numpy(layer.running_var), training=False)
    np.testing.assert_allclose(y, ref, atol=1e-5)
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
    xs, dys = backend.to_numpy(x).astype(np.float64), backend.to_numpy(dy).astype(np.float64)
    kind = "ln" if isinstance(lay, bn.LayerNorm) else (
        "cl" if getattr(lay, "channels_last", False) else "cf")
    groups = 2 if kind == "ln" else getattr(lay, "num_groups", 6)
    ref_y, ref_dx, ref_dw, ref_db = _oracle(xs, dys, backend.to_numpy(lay.weight), None, kind,
                                            groups)
    np.testing.assert_allclose(backend.to_numpy(y), ref_y, atol=1e-4)
    np.testing.assert_allclose(backend.to_numpy(dx), ref_dx, atol=1e-4)
    np.testing.assert_allclose(backend.to_numpy(lay.grad_weight).ravel(), ref_dw, atol=1e-3)
    np.testing.assert_allclose(backend.to_numpy(lay.grad_bias).ravel(), ref_db, atol=1e-3)

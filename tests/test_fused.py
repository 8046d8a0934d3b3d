"""Fused ReLU and residual, channels-last layers, and folding into conv/linear weights."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import bncupy as bn
from tests import agreement, oracle
from tests.arrays import assign
from tests.test_properties import cases, make, put, representable
from tests.tolerances import Bounds, channels, check, overflowing

LAYERS = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d, 5: bn.BatchNorm3d}


@given(case=cases(), training=st.booleans(), with_residual=st.booleans())
def test_fused_relu_residual_forward_matches_oracle(backend, case, training, with_residual):
    x = make(case)
    z = make({**case, "offset": 0.0}, seed_shift=11) if with_residual else None
    axis = case["axis"]
    w, b, rm0, rv0 = agreement.parameters(x.shape[axis], x.dtype,
                                          np.random.default_rng(case["seed"] + 1), case["params"])
    arrange = put(case, backend)
    rm, rv = backend.asarray(rm0.copy()), backend.asarray(rv0.copy())
    y = bn.batch_norm(arrange(x), rm, rv, backend.asarray(w), backend.asarray(b), training,
                      axis=axis, activation="relu", residual=None if z is None else arrange(z))
    ref = oracle.forward(x, axis, w, b, 1e-5, training, rm0, rv0)[0]
    if z is not None:
        ref = ref + z.astype(np.float64)
    y = backend.to_numpy(y)
    assert y.dtype == x.dtype and (y >= 0).all()
    bound = Bounds(channels(x, axis), x.dtype, w, b, None if z is None else channels(z, axis),
                   stats=None if training else (rm0, rv0))
    check(channels(y, axis), channels(overflowing(np.maximum(ref, 0.0), x.dtype), axis),
          bound.y, "y")


@given(case=cases(), training=st.booleans(), with_residual=st.booleans())
def test_fused_layer_backward_matches_oracle(backend, case, training, with_residual):
    axis = case["axis"]
    c = case["shape"][axis]
    dtype = case["dtype"]
    pd = np.float64 if dtype == np.float64 else np.float32
    layer = LAYERS[len(case["shape"])](c, dtype=pd, channels_last=axis == -1,
                                       activation="relu")
    assign(layer.weight, np.linspace(0.5, 2.0, c))
    assign(layer.bias, np.linspace(-0.5, 0.5, c))
    layer.to(backend.name)
    layer(backend.asarray(make(case, seed_shift=5)))  # non-trivial running statistics
    layer.train(training)
    x = make(case)
    assume(representable(case, x))
    z = make(case, seed_shift=11) if with_residual else None
    dy = make({**case, "offset": 0.0}, seed_shift=7)
    rm, rv = backend.to_numpy(layer.running_mean), backend.to_numpy(layer.running_var)
    arrange = put(case, backend)
    y = backend.to_numpy(layer(arrange(x), residual=None if z is None else arrange(z)))
    dx = backend.to_numpy(layer.backward(arrange(dy)))
    g = dy * (y > 0)  # ReLU's derivative at the layer's own output
    w = backend.to_numpy(layer.weight)
    ref_dx, ref_dw, ref_db = oracle.backward(g, x, axis, w, 1e-5, training, rm, rv)
    bound = Bounds(channels(x, axis), dtype, w, stats=None if training else (rm, rv))
    bound_dx, bound_dw, bound_db = bound.backward(channels(g, axis), training,
                                                  saved_mean=not training)
    check(channels(dx, axis), channels(overflowing(ref_dx, dtype), axis), bound_dx, "dx",
          bound.scales["dx"])
    check(backend.to_numpy(layer.grad_weight), overflowing(ref_dw, pd), bound_dw,
          "grad_weight", bound.scales["dw"])
    check(backend.to_numpy(layer.grad_bias), overflowing(ref_db, pd), bound_db, "grad_bias",
          bound.scales["db"])
    if z is None:
        assert layer.grad_residual is None
    else:
        np.testing.assert_array_equal(backend.to_numpy(layer.grad_residual), g)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_channels_last_layer_equals_channels_first(backend, dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 6, 5, 7)) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    first, last = bn.BatchNorm2d(6), bn.BatchNorm2d(6, channels_last=True)
    y1 = backend.to_numpy(first(backend.asarray(x)))
    y2 = backend.to_numpy(last(backend.asarray(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))))
    bound = Bounds(channels(x, 1), dtype)
    check(channels(y2.transpose(0, 3, 1, 2), 1), channels(y1, 1), 2 * bound.y, "y")
    d1 = backend.to_numpy(first.backward(backend.asarray(dy)))
    d2 = backend.to_numpy(last.backward(backend.asarray(np.ascontiguousarray(
        dy.transpose(0, 2, 3, 1)))))
    bound_dx = bound.backward(channels(dy, 1))[0]
    check(channels(d2.transpose(0, 3, 1, 2), 1), channels(d1, 1), 2 * bound_dx, "dx",
          bound.scales["dx"])
    bound_rv = bound.running(np.ones(6), np.ones(6), 0.1, np.float32, np.float32)[1]
    check(backend.to_numpy(last.running_var), backend.to_numpy(first.running_var), 2 * bound_rv,
          "running_var")


def _conv(x, w, b):
    """Plain NCHW cross-correlation (stride 1, no padding) for any number of spatial dims."""
    k = w.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, k, axis=tuple(range(2, x.ndim)))
    letters = "uvw"[:len(k)]
    out = np.einsum(f"ni...{letters},oi{letters}->no...", windows, w)
    return out + b.reshape((1, -1) + (1,) * len(k))


@pytest.mark.parametrize("kernel, layer_cls", [((3,), bn.BatchNorm1d), ((3, 2), bn.BatchNorm2d),
                                               ((2, 2, 2), bn.BatchNorm3d)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_conv_reproduces_conv_then_bn(kernel, layer_cls, with_bias):
    rng = np.random.default_rng(1)
    o, i = 5, 3
    w = rng.standard_normal((o, i, *kernel))
    b = rng.standard_normal(o) if with_bias else None
    x = rng.standard_normal((2, i, *(6,) * len(kernel)))
    layer = layer_cls(o, dtype=np.float64)
    for seed in range(3):  # train to get running statistics, then freeze
        layer(_conv(rng.standard_normal(x.shape) * 2 + seed, w, np.zeros(o) if b is None else b))
    assign(layer.weight, rng.uniform(0.5, 2, o))
    assign(layer.bias, rng.standard_normal(o))
    layer.eval()
    expected = layer(_conv(x, w, np.zeros(o) if b is None else b))
    w2, b2 = bn.fold_into(w, b, layer)
    np.testing.assert_allclose(_conv(x, w2, b2), expected, atol=1e-10)
    assert w2.shape == w.shape and w2.dtype == w.dtype and b2.shape == (o,)


def test_fold_into_linear_keeps_dtype_and_inputs():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 7)).astype(np.float32)
    w_before = w.copy()
    layer = bn.BatchNorm1d(4)
    layer(rng.standard_normal((16, 4)).astype(np.float32) * 3 + 2)
    layer.eval()
    x = rng.standard_normal((9, 7)).astype(np.float32)
    w2, b2 = bn.fold_into(w, None, layer)
    np.testing.assert_allclose(x @ w2.T + b2, layer(x @ w.T), atol=1e-5)
    assert w2.dtype == np.float32 and b2.dtype == np.float32
    np.testing.assert_array_equal(w, w_before)

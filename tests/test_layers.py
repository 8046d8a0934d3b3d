"""Layer semantics: modes, running statistics, state dicts, backward, placement."""

from __future__ import annotations

import numpy as np
import pytest

import bncupy as bn
from tests import oracle
from tests.arrays import assign, to_numpy


def _x(shape=(6, 3, 4, 4), seed=0, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + 1).astype(dtype)


def test_defaults_match_torch():
    layer = bn.BatchNorm2d(3)
    assert layer.training and layer.eps == 1e-5 and layer.momentum == 0.1
    assert list(layer.state_dict()) == ["weight", "bias", "running_mean", "running_var",
                                        "num_batches_tracked"]
    sd = layer.state_dict()
    assert (sd["weight"] == 1).all() and (sd["bias"] == 0).all()
    assert (sd["running_mean"] == 0).all() and (sd["running_var"] == 1).all()
    assert sd["num_batches_tracked"].dtype == np.int64 and int(sd["num_batches_tracked"]) == 0
    assert sd["weight"].dtype == np.float32
    assert "BatchNorm2d(3, eps=1e-05" in repr(layer)


def test_train_updates_eval_uses_running_stats():
    layer = bn.BatchNorm2d(3)
    x = _x()
    y = layer(x)
    ref, _, _, rm, rv = oracle.forward(x, 1, None, None, 1e-5, True, np.zeros(3), np.ones(3))
    np.testing.assert_allclose(y, ref, atol=1e-5)
    np.testing.assert_allclose(layer.running_mean, rm, rtol=1e-6)
    np.testing.assert_allclose(layer.running_var, rv, rtol=1e-6)
    assert layer.eval() is layer and not layer.training
    x2 = _x(seed=1)
    np.testing.assert_allclose(layer(x2), oracle.forward(x2, 1, None, None, 1e-5, False, rm, rv)[0],
                               atol=1e-5)
    assert int(layer.num_batches_tracked) == 1  # eval does not count


def test_momentum_none_is_cumulative_average():
    layer = bn.BatchNorm1d(2, momentum=None, dtype=np.float64)
    batches = [np.random.default_rng(i).standard_normal((5, 2)) + i for i in range(4)]
    for b in batches:
        layer(b)
    np.testing.assert_allclose(layer.running_mean, np.mean([b.mean(0) for b in batches], axis=0))
    np.testing.assert_allclose(layer.running_var,
                               np.mean([b.var(0, ddof=1) for b in batches], axis=0))


def test_no_tracking_uses_batch_stats_in_eval_and_has_no_running_keys():
    layer = bn.BatchNorm2d(3, track_running_stats=False).eval()
    x = _x()
    np.testing.assert_allclose(layer(x), oracle.forward(x)[0], atol=1e-5)
    assert list(layer.state_dict()) == ["weight", "bias"]
    assert layer.running_mean is None and layer.num_batches_tracked is None


def test_affine_false_has_no_parameters_or_gradients():
    layer = bn.BatchNorm1d(3, affine=False)
    x = _x((8, 3))
    layer(x)
    layer.backward(np.ones_like(x))
    assert layer.weight is None and layer.grad_weight is None
    assert list(layer.state_dict()) == ["running_mean", "running_var", "num_batches_tracked"]


@pytest.mark.parametrize("cls, shape", [(bn.BatchNorm1d, (7, 3)), (bn.BatchNorm1d, (4, 3, 5)),
                                        (bn.BatchNorm2d, (3, 3, 4, 5)),
                                        (bn.BatchNorm3d, (2, 3, 2, 3, 4))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_in_train_and_eval(cls, shape, channels_last):
    if channels_last:
        shape = (shape[0], *shape[2:], shape[1])
    axis = -1 if channels_last else 1
    layer = cls(3, dtype=np.float64, channels_last=channels_last)
    assign(layer.weight, [0.5, 2.0, -1.0])
    x = _x(shape, dtype=np.float64)
    dy = _x(shape, seed=5, dtype=np.float64)
    layer(x)
    dx = layer.backward(dy)
    ref_dx, ref_dw, ref_db = oracle.backward(dy, x, axis, layer.weight)
    np.testing.assert_allclose(dx, ref_dx, atol=1e-10)
    np.testing.assert_allclose(layer.grad_weight, ref_dw, atol=1e-10)
    np.testing.assert_allclose(layer.grad_bias, ref_db, atol=1e-10)
    layer.eval()
    layer(x)
    dx = layer.backward(dy)
    ref_dx, _, _ = oracle.backward(dy, x, axis, layer.weight, training=False,
                                   running_mean=layer.running_mean, running_var=layer.running_var)
    np.testing.assert_allclose(dx, ref_dx, atol=1e-10)


def test_backward_before_forward_is_an_error():
    with pytest.raises(RuntimeError, match="before a forward"):
        bn.BatchNorm2d(3).backward(np.zeros((2, 3, 2, 2), np.float32))


def test_state_dict_round_trip_and_copies():
    a = bn.BatchNorm2d(3)
    for seed in range(3):
        a(_x(seed=seed))
    sd = a.state_dict()
    sd["running_mean"][...] = 123  # a copy: the layer is unaffected
    assert not (a.running_mean == 123).any()
    b = bn.BatchNorm2d(3, dtype=np.float64)
    b.load_state_dict(a.state_dict())
    assert b.running_mean.dtype == np.float64 and int(b.num_batches_tracked) == 3
    np.testing.assert_allclose(to_numpy(b.running_var), a.running_var)
    x = _x(seed=9)
    np.testing.assert_allclose(b.eval()(x), a.eval()(x), atol=1e-6)


def test_num_batches_tracked_counts_only_successful_calls():
    layer = bn.BatchNorm2d(3, momentum=None)
    with pytest.raises(ValueError):
        layer(_x((1, 3, 1, 1)))
    assert int(layer.num_batches_tracked) == 0
    layer(_x())
    assert int(layer.num_batches_tracked) == 1


def test_input_dtypes_keep_their_dtype_with_float32_layer():
    layer = bn.BatchNorm2d(3)
    for dtype in (np.float16, np.float32, np.float64):
        y = layer(_x(dtype=dtype))
        assert y.dtype == dtype
        assert layer.running_mean.dtype == np.float32


def test_float16_accumulates_in_float32():
    x = (np.random.default_rng(0).standard_normal((64, 2, 32, 32)) * 0.01 + 100).astype(np.float16)
    y = bn.batch_norm(x, None, None, training=True)
    ref = oracle.forward(x)[0]
    np.testing.assert_allclose(y.astype(np.float64), ref, atol=2e-2)


def test_layer_with_numpy_backend_forced():
    with bn.use_backend("numpy"):
        layer = bn.BatchNorm1d(4)
        assert isinstance(layer.weight, np.ndarray)
        layer(_x((5, 4)))
    assert layer.to("numpy") is layer


def test_dtype_none_means_float32():
    layer = bn.BatchNorm2d(3, dtype=None)
    assert layer.dtype == np.float32 and layer.weight.dtype == np.float32

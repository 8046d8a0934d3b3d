"""The rest of torch's BatchNorm API on bncupy's layers: bias=, dtype=None, repr, resets,
track_running_stats toggled, empty batches, state dicts from torch (ints, old checkpoints,
strict=False). tests/test_torch_interop.py checks the same behaviours against torch itself."""

from __future__ import annotations

import numpy as np
import pytest

import bncupy as bn
from tests import oracle
from tests.arrays import assign, to_numpy
from tests.foreign import HostArray


def _x(shape=(6, 3, 4, 4), seed=0, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + 1).astype(dtype)


def _state(layer):
    return {k: to_numpy(v) for k, v in layer.state_dict().items()}


def _trained(cls=bn.BatchNorm2d, shape=(6, 3, 4, 4), **kwargs):
    layer = cls(3, **kwargs)
    for seed in range(3):
        layer(_x(shape, seed))
    return layer


# ------------------------------------------------------------------------------ constructor
def test_bias_false_learns_weight_only():
    layer = bn.BatchNorm2d(3, bias=False)
    assert layer.bias is None and layer.weight is not None
    assert list(layer.state_dict()) == ["weight", "running_mean", "running_var",
                                        "num_batches_tracked"]
    assign(layer.weight, [0.5, 2.0, -1.0])
    x, dy = _x(), _x(seed=1)
    np.testing.assert_allclose(to_numpy(layer(x)),
                               oracle.forward(x, weight=[0.5, 2.0, -1.0])[0], atol=2e-5)
    layer.backward(dy)
    assert layer.grad_bias is None
    np.testing.assert_allclose(to_numpy(layer.grad_weight), oracle.backward(dy, x)[1], rtol=1e-4)
    assert bn.BatchNorm1d(3, affine=False, bias=True).bias is None  # bias needs affine
    with pytest.raises(TypeError, match="bias"):
        bn.BatchNorm2d(3, bias="no")


def test_dtype_none_is_float32():
    assert bn.BatchNorm2d(3).dtype == np.float32
    assert bn.BatchNorm2d(3, dtype=None).weight.dtype == np.float32
    assert bn.BatchNorm2d(3, dtype=np.float64).running_var.dtype == np.float64


def test_repr_is_torchs_extra_repr_then_bncupys_options():
    assert repr(bn.BatchNorm2d(3)) == ("BatchNorm2d(3, eps=1e-05, momentum=0.1, affine=True, "
                                       "bias=True, track_running_stats=True)")
    layer = bn.BatchNorm1d(4, eps=1e-3, momentum=None, affine=False, track_running_stats=False,
                           dtype=np.float64, channels_last=True, activation="relu")
    assert repr(layer) == ("BatchNorm1d(4, eps=0.001, momentum=None, affine=False, bias=False, "
                           "track_running_stats=False, dtype=float64, channels_last=True, "
                           "activation='relu')")
    assert layer.extra_repr() == repr(layer)[len("BatchNorm1d("):-1]


# ------------------------------------------------------------------------------ resets
def test_reset_running_stats_and_parameters_in_place():
    layer = _trained()
    assign(layer.weight, [2.0, 3.0, 4.0])
    assign(layer.bias, [1.0, 1.0, 1.0])
    arrays = [layer.weight, layer.bias, layer.running_mean, layer.running_var]
    layer.reset_running_stats()
    assert (to_numpy(layer.running_mean) == 0).all() and (to_numpy(layer.running_var) == 1).all()
    assert int(layer.num_batches_tracked) == 0
    assert (to_numpy(layer.weight) == [2, 3, 4]).all()  # parameters untouched
    layer.reset_parameters()
    assert (to_numpy(layer.weight) == 1).all() and (to_numpy(layer.bias) == 0).all()
    now = [layer.weight, layer.bias, layer.running_mean, layer.running_var]
    assert all(a is b for a, b in zip(arrays, now, strict=True))  # the same arrays
    bn.BatchNorm2d(3, affine=False, track_running_stats=False).reset_parameters()  # nothing


# ------------------------------------------------------------------------------ toggling
def test_track_running_stats_switched_off_keeps_the_buffers():
    layer = _trained()
    before = _state(layer)
    layer.track_running_stats = False
    assert list(layer.state_dict()) == list(before)
    layer(_x(seed=7))  # training: batch statistics, no update
    after = _state(layer)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    x = _x(seed=8)
    np.testing.assert_allclose(  # eval still normalizes with the running statistics
        to_numpy(layer.eval()(x)),
        oracle.forward(x, training=False, running_mean=before["running_mean"],
                       running_var=before["running_var"])[0], atol=2e-5)
    layer.running_mean[...] = 5
    layer.reset_running_stats()  # not tracking: left alone, as torch
    assert (to_numpy(layer.running_mean) == 5).all()
    assert "track_running_stats=False" in repr(layer)


def test_track_running_stats_switched_on_creates_nothing():
    layer = bn.BatchNorm2d(3, track_running_stats=False)
    layer.track_running_stats = True
    layer(_x())
    assert layer.running_mean is None and layer.num_batches_tracked is None
    assert list(layer.state_dict()) == ["weight", "bias"]
    layer.reset_running_stats()


# ------------------------------------------------------------------------------ empty input
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (5, 3, 0, 4)])
def test_empty_batch_in_training_gives_an_empty_output(backend, shape):
    layer = _trained()
    layer.to(backend.name)
    before = _state(layer)
    x = backend.asarray(np.zeros(shape, np.float32))
    y = layer(x)
    assert y.shape == shape and y.dtype == np.float32
    after = _state(layer)
    np.testing.assert_array_equal(after["running_mean"], before["running_mean"])
    np.testing.assert_array_equal(after["running_var"], before["running_var"])
    assert int(after["num_batches_tracked"]) == int(before["num_batches_tracked"]) + 1
    assert layer.backward(x).shape == shape
    assert (to_numpy(layer.grad_weight) == 0).all() and (to_numpy(layer.grad_bias) == 0).all()
    y, save_mean, save_invstd = bn.batch_norm_forward(x, None, None, training=True)
    assert y.shape == shape and np.isnan(to_numpy(save_mean)).all()
    dx, dw, db = bn.batch_norm_backward(x, x, None, save_mean, save_invstd)
    assert dx.shape == shape and (to_numpy(dw) == 0).all() and (to_numpy(db) == 0).all()


def test_one_value_per_channel_is_still_the_error():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn.batch_norm(np.zeros((1, 3, 1, 1), np.float32), None, None, training=True)
    assert bn.batch_norm(np.zeros((4, 0), np.float32), None, None, training=True).shape == (4, 0)


@pytest.mark.parametrize("training", [True, False])
def test_empty_1d_input_is_an_empty_batch(training):
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    x = np.zeros(0, np.float32)
    y = bn.batch_norm(x, rm, rv, np.ones(3, np.float32), None, training=training)
    assert y.shape == (0,) and y.dtype == np.float32
    assert (rm == 0).all() and (rv == 1).all()
    y, save_mean, _ = bn.batch_norm_forward(x, None, None, training=True)
    assert y.shape == (0,) and save_mean.shape == (0,)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        bn.batch_norm(np.zeros(5, np.float32), None, None, training=True)
    with pytest.raises(ValueError, match="dimensions"):  # layers: a ValueError, as torch's
        bn.BatchNorm1d(3)(x)


# ------------------------------------------------------------------------------ state dicts
def test_counter_may_be_an_int_a_0d_array_or_missing():
    source = _trained()
    state = source.state_dict()
    for counter in (7, np.int32(7), np.array(7, np.int32), np.array(7, np.uint8),
                    HostArray(np.array(7))):
        layer = bn.BatchNorm2d(3)
        assert layer.load_state_dict({**state, "num_batches_tracked": counter}) == ([], [])
        assert layer.num_batches_tracked.dtype == np.int64 and int(layer.num_batches_tracked) == 7
    old_checkpoint = {k: v for k, v in state.items() if k != "num_batches_tracked"}
    layer = bn.BatchNorm2d(3)
    missing, unexpected = layer.load_state_dict(old_checkpoint)
    assert (missing, unexpected) == ([], [])
    assert int(layer.num_batches_tracked) == 0
    np.testing.assert_array_equal(to_numpy(layer.running_var), to_numpy(source.running_var))
    layer = _trained(shape=(4, 3, 2, 2))  # a layer's own count is kept, as torch keeps it
    layer.load_state_dict(old_checkpoint)
    assert int(layer.num_batches_tracked) == 3


def test_foreign_arrays_load():
    source = _trained()
    layer = bn.BatchNorm2d(3, dtype=np.float64)
    layer.load_state_dict({k: HostArray(to_numpy(v)) for k, v in source.state_dict().items()})
    assert layer.running_mean.dtype == np.float64
    np.testing.assert_allclose(to_numpy(layer.running_mean), to_numpy(source.running_mean))


def test_strict_false_returns_missing_and_unexpected_keys():
    source, layer = _trained(), bn.BatchNorm2d(3)
    state = {"running_mean": source.state_dict()["running_mean"], "gamma": np.ones(3),
             "bias": np.full(3, 2.0, np.float32)}
    missing, unexpected = layer.load_state_dict(state, strict=False)
    assert missing == ["weight", "running_var"] and unexpected == ["gamma"]
    result = layer.load_state_dict(state, strict=False)
    assert result.missing_keys == missing and result.unexpected_keys == unexpected
    np.testing.assert_array_equal(to_numpy(layer.running_mean), to_numpy(source.running_mean))
    assert (to_numpy(layer.bias) == 2).all() and (to_numpy(layer.weight) == 1).all()
    assert (to_numpy(layer.running_var) == 1).all() and int(layer.num_batches_tracked) == 0
    with pytest.raises(ValueError, match=r"missing \['running_var', 'weight'\]"):
        layer.load_state_dict(state)


@pytest.mark.parametrize("bad, error, fragment", [
    ({"num_batches_tracked": 2**63}, ValueError, "int64"),
    ({"num_batches_tracked": -1}, ValueError, "num_batches_tracked"),
    ({"num_batches_tracked": np.array(2**64 - 1, np.uint64)}, ValueError, "int64"),
    ({"num_batches_tracked": True}, TypeError, "num_batches_tracked"),
    ({"num_batches_tracked": 3.0}, TypeError, "num_batches_tracked"),
    ({"running_var": np.ones(4, np.float32)}, ValueError, "running_var"),
    ({"weight": HostArray(np.ones(3, np.int64))}, TypeError, "weight"),
])
@pytest.mark.parametrize("strict", [True, False])
def test_failed_load_changes_nothing(bad, error, fragment, strict):
    layer = _trained()
    state = {**_trained(shape=(4, 3, 2, 2)).state_dict(), **bad}
    if not strict:
        state["unexpected"] = np.zeros(1)
    before = _state(layer)
    with pytest.raises(error, match=fragment):
        layer.load_state_dict(state, strict=strict)
    after = _state(layer)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)

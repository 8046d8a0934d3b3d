"""The same numbers as PyTorch (CPU) for the functional API, layers and autograd."""

from __future__ import annotations

import numpy as np
import pytest

import bncupy as bn

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.mark.parametrize("shape, axis", [((8, 4), 1), ((4, 3, 7), 1), ((4, 3, 5, 6), 1),
                                         ((2, 3, 2, 3, 4), 1), ((4, 5, 6, 3), -1)])
@pytest.mark.parametrize("training", [True, False])
def test_functional_forward_and_autograd_match_torch(shape, axis, training):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * 3 + 2
    c = shape[axis]
    w, b = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    dy = rng.standard_normal(shape)
    tx = torch.tensor(np.moveaxis(x, axis, 1), requires_grad=True)
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    ty = F.batch_norm(tx, trm, trv, tw, tb, training, 0.1, 1e-5)
    ty.backward(torch.tensor(np.moveaxis(dy, axis, 1)))

    y, save_mean, save_invstd = bn.batch_norm_forward(x, rm, rv, w, b, training, 0.1, 1e-5,
                                                      axis=axis)
    dx, dw, db = bn.batch_norm_backward(dy, x, w, save_mean, save_invstd, training=training,
                                        axis=axis)
    np.testing.assert_allclose(y, np.moveaxis(ty.detach().numpy(), 1, axis), atol=1e-12)
    np.testing.assert_allclose(rm, trm.numpy(), atol=1e-12)
    np.testing.assert_allclose(rv, trv.numpy(), atol=1e-12)
    np.testing.assert_allclose(dx, np.moveaxis(tx.grad.numpy(), 1, axis), atol=1e-11)
    np.testing.assert_allclose(dw, tw.grad.numpy(), atol=1e-11)
    np.testing.assert_allclose(db, tb.grad.numpy(), atol=1e-11)


@pytest.mark.parametrize("momentum", [0.1, None, 1.0, 0.0])
@pytest.mark.parametrize("track", [True, False])
def test_layer_sequence_matches_torch(momentum, track):
    layer = bn.BatchNorm2d(3, momentum=momentum, track_running_stats=track)
    tlayer = torch.nn.BatchNorm2d(3, momentum=momentum, track_running_stats=track)
    rng = np.random.default_rng(1)
    for step in range(4):
        x = (rng.standard_normal((4, 3, 5, 5)) * (step + 1) + step).astype(np.float32)
        if step == 3:
            layer.eval()
            tlayer.eval()
        np.testing.assert_allclose(layer(x), tlayer(torch.from_numpy(x)).detach().numpy(),
                                   atol=2e-5)
    for key, value in tlayer.state_dict().items():
        np.testing.assert_allclose(layer.state_dict()[key], value.numpy(), rtol=1e-5, atol=1e-6)
    assert list(layer.state_dict()) == list(tlayer.state_dict())


def test_load_torch_state_dict():
    tlayer = torch.nn.BatchNorm1d(4)
    tlayer(torch.randn(16, 4) * 3 + 1)
    layer = bn.BatchNorm1d(4)
    layer.load_state_dict({k: v.numpy() for k, v in tlayer.state_dict().items()})
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(layer.eval()(x), tlayer.eval()(torch.from_numpy(x)).detach().numpy(),
                               atol=1e-6)


def test_same_error_for_single_value_per_channel():
    x = np.zeros((1, 3), np.float32)
    with pytest.raises(ValueError) as ours:
        bn.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError) as theirs:
        F.batch_norm(torch.from_numpy(x), None, None, training=True)
    prefix = "Expected more than 1 value per channel when training, got input size "
    assert str(ours.value).startswith(prefix) and str(theirs.value).startswith(prefix)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_relu_residual_layer_matches_torch_autograd(channels_last):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 5, 6))
    z = rng.standard_normal(x.shape)
    dy = rng.standard_normal(x.shape)
    tbn = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    tx = torch.tensor(x, requires_grad=True)
    tz = torch.tensor(z, requires_grad=True)
    ty = torch.relu(tbn(tx) + tz)
    ty.backward(torch.tensor(dy))

    perm = (0, 2, 3, 1) if channels_last else (0, 1, 2, 3)
    inv = (0, 3, 1, 2) if channels_last else (0, 1, 2, 3)

    def to_layout(a):
        return np.ascontiguousarray(a.transpose(perm))

    layer = bn.BatchNorm2d(3, dtype=np.float64, channels_last=channels_last, activation="relu")
    y = layer(to_layout(x), residual=to_layout(z))
    dx = layer.backward(to_layout(dy))
    np.testing.assert_allclose(y.transpose(inv), ty.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(dx.transpose(inv), tx.grad.numpy(), atol=1e-11)
    np.testing.assert_allclose(layer.grad_residual.transpose(inv), tz.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(layer.grad_weight, tbn.weight.grad.numpy(), atol=1e-11)
    np.testing.assert_allclose(layer.grad_bias, tbn.bias.grad.numpy(), atol=1e-11)

"""The same numbers as PyTorch (CPU) for the functional API, layers and autograd."""

from __future__ import annotations

import numpy as np
import pytest

import bncupy as bn
from tests.arrays import to_numpy
from tests.conftest import needs

torch = needs("torch", "torch", "torch is not installed (tox env 'torch' has it)")
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


def _torch_grads(fn, x, params, dy):
    tx = torch.tensor(x, requires_grad=True)
    tp = [torch.tensor(p, requires_grad=True) for p in params]
    ty = fn(tx, *tp)
    ty.backward(torch.tensor(dy))
    return ty.detach().numpy(), tx.grad.numpy(), [p.grad.numpy() for p in tp]


@pytest.mark.parametrize("shape, normalized", [((6, 7), (7,)), ((3, 4, 5, 6), (5, 6)),
                                               ((2, 3, 4), (2, 3, 4))])
def test_layer_norm_matches_torch(shape, normalized):
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal(shape) * 3 + 2, rng.standard_normal(shape)
    w, b = rng.uniform(0.5, 2, normalized), rng.standard_normal(normalized)
    ty, tdx, (tdw, tdb) = _torch_grads(lambda t, tw, tb: F.layer_norm(t, normalized, tw, tb),
                                       x, (w, b), dy)
    y, mean, rstd = bn.layer_norm_forward(x, normalized, w, b)
    dx, dw, db = bn.layer_norm_backward(dy, x, normalized, mean, rstd, w)
    for ours, theirs in ((y, ty), (dx, tdx), (dw, tdw), (db, tdb)):
        np.testing.assert_allclose(ours, theirs, atol=1e-11)


@pytest.mark.parametrize("shape, groups", [((4, 6, 5), 3), ((2, 8, 3, 4), 2), ((2, 8, 3, 4), 8),
                                           ((3, 4, 2, 2, 2), 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_matches_torch(shape, groups, channels_last):
    rng = np.random.default_rng(2)
    x, dy = rng.standard_normal(shape) * 3 + 2, rng.standard_normal(shape)
    c = shape[1]
    w, b = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    ty, tdx, (tdw, tdb) = _torch_grads(lambda t, tw, tb: F.group_norm(t, groups, tw, tb), x,
                                       (w, b), dy)
    axis = -1 if channels_last else 1
    xs, dys = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) if channels_last else a
               for a in (x, dy))
    y, mean, rstd = bn.group_norm_forward(xs, groups, w, b, axis=axis)
    dx, dw, db = bn.group_norm_backward(dys, xs, groups, mean, rstd, w, axis=axis)
    y, dx = (np.moveaxis(a, -1, 1) if channels_last else a for a in (y, dx))
    for ours, theirs in ((y, ty), (dx, tdx), (dw, tdw), (db, tdb)):
        np.testing.assert_allclose(ours, theirs, atol=1e-11)


@pytest.mark.parametrize("cls, tcls, shape", [(bn.InstanceNorm1d, torch.nn.InstanceNorm1d,
                                               (4, 3, 7)),
                                              (bn.InstanceNorm2d, torch.nn.InstanceNorm2d,
                                               (2, 3, 4, 5)),
                                              (bn.InstanceNorm3d, torch.nn.InstanceNorm3d,
                                               (2, 3, 2, 3, 4))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_instance_norm_layers_match_torch_over_steps(cls, tcls, shape, momentum):
    rng = np.random.default_rng(3)
    ours = cls(3, momentum=momentum, affine=True, track_running_stats=True, dtype=np.float64)
    theirs = tcls(3, momentum=momentum, affine=True, track_running_stats=True).double()
    w, b = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    ours.load_state_dict({**ours.state_dict(), "weight": w, "bias": b})
    theirs.load_state_dict({**theirs.state_dict(), "weight": torch.tensor(w),
                            "bias": torch.tensor(b)})
    for step in range(3):
        x, dy = rng.standard_normal(shape) * (step + 1) + step, rng.standard_normal(shape)
        tx = torch.tensor(x, requires_grad=True)
        ty = theirs(tx)
        ty.backward(torch.tensor(dy))
        np.testing.assert_allclose(ours(x), ty.detach().numpy(), atol=1e-11)
        np.testing.assert_allclose(ours.backward(dy), tx.grad.numpy(), atol=1e-10)
        np.testing.assert_allclose(ours.grad_weight, theirs.weight.grad.numpy(), atol=1e-10)
        theirs.zero_grad()
    for key, value in theirs.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[key], value.numpy(), atol=1e-12,
                                   err_msg=key)
    ours.eval()
    theirs.eval()
    x = rng.standard_normal(shape)
    np.testing.assert_allclose(ours(x), theirs(torch.tensor(x)).detach().numpy(), atol=1e-11)


def test_family_state_dicts_load_into_torch_and_back():
    for ours, theirs in ((bn.LayerNorm((4, 5)), torch.nn.LayerNorm((4, 5))),
                         (bn.GroupNorm(2, 6), torch.nn.GroupNorm(2, 6)),
                         (bn.InstanceNorm2d(6, affine=True, track_running_stats=True),
                          torch.nn.InstanceNorm2d(6, affine=True, track_running_stats=True))):
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert repr(ours) == repr(theirs)
        theirs.load_state_dict({k: torch.tensor(to_numpy(v)) for k, v in
                                ours.state_dict().items()})
        ours.load_state_dict(theirs.state_dict())  # torch tensors in


def test_batch_renorm_with_unit_limits_matches_torch_batch_norm():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 3, 4)) * 2 + 1
    layer = bn.BatchNorm1d(3, renorm=True, rmax=1.0, dmax=0.0, dtype=np.float64)
    tlayer = torch.nn.BatchNorm1d(3).double()
    np.testing.assert_allclose(layer(x), tlayer(torch.tensor(x)).detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(layer.running_var, tlayer.running_var.numpy(), atol=1e-12)


# ---------------------------------------------------------------- RMSNorm, residual add, bf16

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_matches_torch_forward_and_autograd(dtype, eps):
    """bn.rms_norm on torch tensors (through DLPack, bfloat16 too) against
    torch.nn.functional.rms_norm and its autograd, eps=None included."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 5, 64, generator=g) + 0.5).to(dtype).requires_grad_(True)
    w = (torch.rand(64, generator=g) + 0.5).to(dtype).requires_grad_(True)
    dy = torch.randn(6, 5, 64, generator=g).to(dtype)
    ty = F.rms_norm(x, (64,), w, eps)
    ty.backward(dy)
    wf = w.detach().float() if dtype != torch.float64 else w.detach()
    y, rstd = bn.rms_norm_forward(x.detach(), 64, wf, eps)
    assert isinstance(y, torch.Tensor) and y.dtype == dtype
    dx, dw = bn.rms_norm_backward(dy, x.detach(), 64, rstd, wf)
    ulp = float(torch.finfo(dtype).eps)
    # torch rounds w * xhat's two factors to the dtype on the way; we keep float32 throughout
    tol = {torch.float64: 1e-12}.get(dtype, 4 * ulp)
    torch.testing.assert_close(y.double(), ty.detach().double(), rtol=tol, atol=tol)
    torch.testing.assert_close(dx.double(), x.grad.double(), rtol=4 * tol, atol=4 * tol)
    torch.testing.assert_close(dw.double(), w.grad.double(), rtol=8 * tol, atol=30 * 8 * tol)


def test_rms_norm_layer_state_and_repr_match_torch():
    for kwargs in ({}, {"eps": 1e-6}, {"elementwise_affine": False}):
        ours, theirs = bn.RMSNorm((4, 8), **kwargs), torch.nn.RMSNorm((4, 8), **kwargs)
        assert repr(ours) == repr(theirs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs = torch.nn.RMSNorm(8)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    ours = bn.RMSNorm(8)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), theirs(x).detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_fused_residual_add_equals_torch_on_the_sum(norm):
    """norm(x + residual) and its gradients, against torch autograd on the explicit sum; the
    gradient reaches x and residual alike, plus the prenorm output's own gradient."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 32, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(32, generator=g, dtype=torch.float64) + 0.5
    dy, dh = torch.randn(4, 32, generator=g, dtype=torch.float64), torch.randn(
        4, 32, generator=g, dtype=torch.float64)
    h = x + r
    ty = F.layer_norm(h, (32,), w, None, 1e-5) if norm == "layer" else F.rms_norm(h, (32,), w,
                                                                                  1e-5)
    torch.autograd.backward([ty, h], [dy, dh])
    if norm == "layer":
        y, m, s, hh = bn.layer_norm_forward(x.detach(), 32, w, None, 1e-5, residual=r.detach())
        dx = bn.layer_norm_backward(dy, hh, 32, m, s, w, grad_prenorm=dh)[0]
    else:
        y, s, hh = bn.rms_norm_forward(x.detach(), 32, w, 1e-5, residual=r.detach())
        dx = bn.rms_norm_backward(dy, hh, 32, s, w, grad_prenorm=dh)[0]
    torch.testing.assert_close(y, ty.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, x.grad, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(dx, r.grad, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("op", ["batch", "layer", "group", "instance"])
def test_bfloat16_cpu_tensors_match_torch(op):
    """torch bfloat16 CPU tensors in and out (no copy on the way in): the same values as torch,
    which computes bfloat16 normalization in float32 as bncupy does, to one bfloat16 ulp."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 6, 5, 5, generator=g) * 2 + 3).to(torch.bfloat16)
    w, b = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    if op == "batch":
        ours, theirs = bn.batch_norm(x, None, None, w, b, True), F.batch_norm(
            x, None, None, w.to(torch.bfloat16), b.to(torch.bfloat16), True)
    elif op == "layer":
        wl, bl = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
        ours, theirs = bn.layer_norm(x, 5, wl, bl), F.layer_norm(
            x, (5,), wl.to(torch.bfloat16), bl.to(torch.bfloat16))
    elif op == "group":
        ours, theirs = bn.group_norm(x, 3, w, b), F.group_norm(
            x, 3, w.to(torch.bfloat16), b.to(torch.bfloat16))
    else:
        ours, theirs = bn.instance_norm(x), F.instance_norm(x)
    assert isinstance(ours, torch.Tensor) and ours.dtype == torch.bfloat16
    ulp = float(torch.finfo(torch.bfloat16).eps)
    diff = (ours.float() - theirs.float()).abs()
    # torch rounds weight and bias to bfloat16 (its parameters share the input's dtype)
    assert (diff <= 2 * ulp * theirs.float().abs() + 2 * ulp).all(), diff.max()


def test_bfloat16_tensor_payload_is_shared_not_copied():
    from bncupy._interop import to_native

    x = torch.randn(8, 4).to(torch.bfloat16)
    native = to_native(x, "input")
    assert native.dtype.name == "bfloat16"
    assert native.__array_interface__["data"][0] == x.data_ptr()
    assert bn.batch_norm(x, None, None, training=True).dtype == torch.bfloat16

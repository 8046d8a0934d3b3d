"""torch tensors in and out, torch checkpoints, torch's BatchNorm API checked against torch
itself, and the ``bncupy.torch`` adapter against torch autograd. CPU tensors run in the tox env
``torch``; CUDA tensors only where a GPU, CuPy and a CUDA build of torch are present."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import bncupy as bn
from tests.arrays import to_numpy
from tests.conftest import REAL_GPU_REASON, needs

torch = needs("torch", "torch", "torch is not installed (tox env 'torch' has it)")
bt = needs("bncupy.torch", "torch", "bncupy.torch does not import")
F = torch.nn.functional

_CUDA_REASON = (REAL_GPU_REASON or ("torch has no CUDA device (a CPU build)"
                                    if not torch.cuda.is_available() else None))
requires_torch_cuda = pytest.mark.skipif(_CUDA_REASON is not None,
                                         reason=f"torch CUDA tensors: {_CUDA_REASON}")


def _t(shape=(6, 3, 5, 4), seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype) * 2 + 1).to(device)


def _stats(c=3, device="cpu", dtype=torch.float32):
    return (torch.linspace(-1, 1, c, dtype=dtype, device=device),
            torch.linspace(0.5, 2, c, dtype=dtype, device=device))


def _same(a, b, atol):
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=atol, rtol=0)


# ------------------------------------------------------------------------------ functional
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_tensors_in_torch_tensors_out_as_torch_computes(training, channels_last):
    x, dy = _t(), _t(seed=1)
    if channels_last:
        x, dy = (a.to(memory_format=torch.channels_last) for a in (x, dy))
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = _stats()
    trm, trv = rm.clone(), rv.clone()
    y, save_mean, save_invstd = bn.batch_norm_forward(x, rm, rv, w, b, training, 0.1, 1e-5)
    tx = x.clone().requires_grad_()
    ty = F.batch_norm(tx, trm, trv, w, b, training, 0.1, 1e-5)
    assert isinstance(y, torch.Tensor) and isinstance(save_invstd, torch.Tensor)
    assert y.stride() == ty.stride() == x.stride()  # memory format kept, as torch
    _same(y, ty.detach(), 2e-5)
    _same(rm, trm, 1e-6)  # running statistics updated in place, as torch updates them
    _same(rv, trv, 1e-6)
    dx, dw, db = bn.batch_norm_backward(dy, x, w, save_mean, save_invstd, training=training)
    ty.backward(dy)
    assert dx.stride() == tx.grad.stride()
    _same(dx, tx.grad, 5e-5)


def test_functional_refuses_tensors_that_require_grad_and_mixed_kinds():
    x = _t()
    with pytest.raises(TypeError, match="input .*detach"):
        bn.batch_norm(x.clone().requires_grad_(), None, None, training=True)
    with pytest.raises(TypeError, match=r"input is a torch.Tensor \(cpu\), running_mean is a "
                                        r"numpy.ndarray"):
        bn.batch_norm(x, np.zeros(3, np.float32), torch.ones(3), training=True)


def test_layer_with_torch_tensors():
    layer = bn.BatchNorm2d(3)
    tlayer = torch.nn.BatchNorm2d(3)
    x = _t()
    y = layer(x)
    assert isinstance(y, torch.Tensor)
    _same(y, tlayer(x).detach(), 2e-5)
    dx = layer.backward(torch.ones_like(x))
    assert isinstance(dx, torch.Tensor)
    _same(torch.as_tensor(to_numpy(layer.running_var)), tlayer.running_var, 1e-6)


def test_zero_size_batch_and_empty_1d_input_as_torch():
    layer, tlayer = bn.BatchNorm2d(3, momentum=None), torch.nn.BatchNorm2d(3, momentum=None)
    for shape in ((0, 3, 4, 4), (4, 3, 0, 2), (5, 3, 2, 2)):
        x = _t(shape)
        assert layer(x).shape == tlayer(x).shape == shape
        np.testing.assert_allclose(to_numpy(layer.running_mean), tlayer.running_mean.numpy(),
                                   rtol=1e-6)
        assert int(layer.num_batches_tracked) == int(tlayer.num_batches_tracked)
    for training in (True, False):
        rm, rv = _stats()
        empty = torch.zeros(0)
        y = bn.batch_norm(empty, rm, rv, training=training)
        assert y.shape == F.batch_norm(empty, rm, rv, training=training).shape == (0,)
    empty = torch.zeros(0, 3)  # torch does not check the statistics' length then; bncupy does
    assert F.batch_norm(empty, torch.zeros(4), torch.ones(4), training=True).shape == (0, 3)
    with pytest.raises(ValueError, match="running_mean must have shape"):
        bn.batch_norm(empty, torch.zeros(4), torch.ones(4), training=True)
    for x in (torch.zeros(1, 3), torch.zeros(2, 1, 1)[:1]):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            F.batch_norm(x, None, None, training=True)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            bn.batch_norm(x, None, None, training=True)


# ------------------------------------------------------------------------------ checkpoints
def test_load_a_torch_state_dict_as_it_is():
    tlayer = torch.nn.BatchNorm2d(3)
    for seed in range(3):
        tlayer(_t(seed=seed))
    layer = bn.BatchNorm2d(3)
    assert layer.load_state_dict(tlayer.state_dict()) == ([], [])
    assert int(layer.num_batches_tracked) == 3
    x = _t(seed=9)
    _same(torch.as_tensor(to_numpy(layer.eval()(x.numpy()))), tlayer.eval()(x).detach(), 2e-5)


def test_old_checkpoint_without_counter_and_int_counter():
    tlayer = torch.nn.BatchNorm1d(3)
    tlayer(_t((8, 3)))
    old = {k: v for k, v in tlayer.state_dict().items() if k != "num_batches_tracked"}
    fresh_torch = torch.nn.BatchNorm1d(3)
    fresh_torch.load_state_dict(old)
    layer = bn.BatchNorm1d(3)
    layer.load_state_dict(old)
    assert int(layer.num_batches_tracked) == int(fresh_torch.num_batches_tracked) == 0
    for module in (layer, fresh_torch):  # a module that has trained keeps its count
        module(_t((8, 3)))
        module(_t((8, 3)))
        module.load_state_dict(old)
    assert int(layer.num_batches_tracked) == int(fresh_torch.num_batches_tracked) == 2
    layer.load_state_dict({**tlayer.state_dict(), "num_batches_tracked": 5})
    assert int(layer.num_batches_tracked) == 5


@pytest.mark.parametrize("state", [
    {"weight": torch.full((3,), 2.0), "foo": torch.ones(1)},
    {"running_mean": torch.ones(3), "running_var": torch.ones(3), "bias": torch.zeros(3)},
])
def test_strict_false_reports_what_torch_reports(state):
    tlayer, layer = torch.nn.BatchNorm2d(3), bn.BatchNorm2d(3)
    theirs = tlayer.load_state_dict(dict(state), strict=False)
    ours = layer.load_state_dict(dict(state), strict=False)
    assert (ours.missing_keys, ours.unexpected_keys) == (theirs.missing_keys,
                                                         theirs.unexpected_keys)
    for key, value in tlayer.state_dict().items():
        np.testing.assert_array_equal(to_numpy(layer.state_dict()[key]), value.numpy())


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"affine": False},
                                    {"track_running_stats": False}, {"momentum": None},
                                    {"eps": 1e-3, "dtype": None}])
def test_repr_state_keys_and_resets_match_torch(kwargs):
    tlayer = torch.nn.BatchNorm2d(3, **kwargs)
    layer = bn.BatchNorm2d(3, **kwargs)
    assert repr(layer) == repr(tlayer)
    assert list(layer.state_dict()) == list(tlayer.state_dict())
    assert {k: v.dtype for k, v in layer.state_dict().items()} == {
        k: np.dtype(str(v.dtype).removeprefix("torch.")) for k, v in tlayer.state_dict().items()}
    for _ in range(2):
        x = _t()
        layer(x)
        tlayer(x)
    layer.reset_parameters()
    tlayer.reset_parameters()
    for key, value in tlayer.state_dict().items():
        np.testing.assert_array_equal(to_numpy(layer.state_dict()[key]), value.numpy())


def test_track_running_stats_toggled_as_torch():
    layer, tlayer = bn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for module in (layer, tlayer):
        module(_t())
        module.track_running_stats = False
        module(_t(seed=1) * 3)
    assert repr(layer) == repr(tlayer)
    for key, value in tlayer.state_dict().items():
        np.testing.assert_allclose(to_numpy(layer.state_dict()[key]), value.numpy(), rtol=1e-6)
    x = _t(seed=2)
    _same(torch.as_tensor(to_numpy(layer.eval()(x.numpy()))), tlayer.eval()(x).detach(), 2e-5)
    layer.running_mean[...] = 3
    tlayer.running_mean.fill_(3)
    for module in (layer, tlayer):
        module.reset_running_stats()
    np.testing.assert_array_equal(layer.running_mean, tlayer.running_mean.numpy())
    late = bn.BatchNorm2d(3, track_running_stats=False)
    tlate = torch.nn.BatchNorm2d(3, track_running_stats=False)
    for module in (late, tlate):
        module.track_running_stats = True
        module(_t())
    assert list(late.state_dict()) == list(tlate.state_dict())
    assert late.num_batches_tracked is None and tlate.num_batches_tracked is None


# ------------------------------------------------------------------------------ the adapter
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape, channels_last", [((4, 3), False), ((3, 2, 5), False),
                                                  ((3, 2, 3, 4), False), ((3, 2, 3, 4), True)])
def test_adapter_gradcheck_float64(training, affine, shape, channels_last):
    x = _t(shape, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    c = shape[1]
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64).requires_grad_()
    rm, rv = _stats(c, dtype=torch.float64)

    def f(x, *params):
        return bt.batch_norm(x, rm.clone(), rv.clone(), *params, training=training)

    params = (w, b) if affine else ()
    assert torch.autograd.gradcheck(f, (x, *params))
    ty = F.batch_norm(x, rm.clone(), rv.clone(), *params, training=training)
    _same(f(x, *params), ty, 1e-12)


@pytest.mark.parametrize("cls, tcls, shape", [(bt.BatchNorm1d, torch.nn.BatchNorm1d, (8, 4)),
                                              (bt.BatchNorm1d, torch.nn.BatchNorm1d, (4, 4, 5)),
                                              (bt.BatchNorm2d, torch.nn.BatchNorm2d, (4, 4, 3, 3)),
                                              (bt.BatchNorm3d, torch.nn.BatchNorm3d,
                                               (2, 4, 2, 3, 3))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_adapter_modules_train_like_torchs(cls, tcls, shape, momentum):
    torch.manual_seed(0)
    ours, theirs = cls(4, momentum=momentum), tcls(4, momentum=momentum)
    assert isinstance(ours, tcls)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 2)
        theirs.bias.uniform_(-1, 1)
    ours.load_state_dict(theirs.state_dict())
    for step in range(3):
        x = _t(shape, seed=step) * (step + 1)
        if step == 2:
            ours.eval()
            theirs.eval()
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        _same(yo.detach(), yt.detach(), 3e-5)
        (yo * x).sum().backward()
        (yt * x).sum().backward()
        _same(xo.grad, xt.grad, 1e-4)
    _same(ours.weight.grad, theirs.weight.grad, 1e-3)
    _same(ours.bias.grad, theirs.bias.grad, 1e-3)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.state_dict()._metadata == theirs.state_dict()._metadata
    for key, value in theirs.state_dict().items():
        _same(ours.state_dict()[key], value, 1e-5)
    theirs.load_state_dict(ours.state_dict())  # and back


def test_replace_batch_norms_in_a_torch_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5),
                                torch.nn.BatchNorm1d(5, affine=False))
    model(_t((4, 3, 6, 6)))  # running statistics that are not the initial ones
    reference = copy.deepcopy(model)
    swapped = bt.replace_batch_norms(model)
    assert isinstance(swapped[1], bt.BatchNorm2d) and isinstance(swapped[5], bt.BatchNorm1d)
    assert repr(swapped) == repr(reference)
    x = _t((4, 3, 6, 6), seed=5)
    for mode in (True, False):
        swapped.train(mode)
        reference.train(mode)
        _same(swapped(x).detach(), reference(x).detach(), 5e-5)
    swapped.train()
    reference.train()
    swapped(x).square().sum().backward()
    reference(x).square().sum().backward()
    _same(swapped[0].weight.grad, reference[0].weight.grad, 2e-3)


def test_adapter_rejects_what_bncupy_rejects():
    layer = bt.BatchNorm2d(3, momentum=1.5)
    with pytest.raises(ValueError, match="momentum"):
        layer(_t())


# ------------------------------------------------------------------------------ CUDA tensors
@requires_torch_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_cuda_tensors_run_the_cuda_kernels(channels_last):
    x, dy = _t(device="cuda"), _t(seed=1, device="cuda")
    if channels_last:
        x, dy = (a.to(memory_format=torch.channels_last) for a in (x, dy))
    rm, rv = _stats(device="cuda")
    trm, trv = rm.clone(), rv.clone()
    y, m, s = bn.batch_norm_forward(x, rm, rv, None, None, True)
    tx = x.clone().requires_grad_()
    ty = F.batch_norm(tx, trm, trv, None, None, True)
    assert y.is_cuda and y.stride() == x.stride()
    _same(y, ty.detach(), 5e-5)
    _same(rm, trm, 1e-5)
    dx, _, _ = bn.batch_norm_backward(dy, x, None, m, s)
    ty.backward(dy)
    assert dx.is_cuda and dx.stride() == x.stride()
    _same(dx, tx.grad, 2e-4)


@requires_torch_cuda
@pytest.mark.gpu
def test_adapter_on_cuda_matches_torch():
    ours, theirs = bt.BatchNorm2d(4).cuda(), torch.nn.BatchNorm2d(4).cuda()
    x = _t((8, 4, 6, 6), device="cuda").to(memory_format=torch.channels_last)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yt = ours(xo), theirs(xt)
    assert yo.stride() == yt.stride()
    _same(yo.detach(), yt.detach(), 5e-5)
    yo.square().sum().backward()
    yt.square().sum().backward()
    _same(xo.grad, xt.grad, 5e-4)
    _same(ours.running_var, theirs.running_var, 1e-5)


@requires_torch_cuda
@pytest.mark.gpu
def test_cuda_array_interface_only():
    import cupy

    class Interface:  # memory another library owns, described only by the CUDA array interface
        def __init__(self, t):
            self.t = t
            self.__cuda_array_interface__ = t.__cuda_array_interface__

    x = _t(device="cuda")
    y = bn.batch_norm(Interface(x), None, None, training=True)
    assert isinstance(y, cupy.ndarray)  # no from_dlpack to give it back through: CuPy's kind
    _same(torch.as_tensor(y, device="cuda"), F.batch_norm(x, None, None, training=True), 5e-5)

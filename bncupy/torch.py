"""PyTorch modules that compute with bncupy: drop-in ``BatchNorm1d/2d/3d`` with autograd.

Imported only on demand (``import bncupy.torch`` needs torch; ``import bncupy`` never imports
it). CUDA tensors run bncupy's CUDA kernels (the CuPy backend, sharing the tensors' memory through
DLPack); CPU tensors run the NumPy backend. The modules subclass torch's own, so parameters,
buffers, ``state_dict`` (keys and version), ``reset_parameters``, ``repr`` and ``isinstance``
checks are torch's; only the computation is bncupy's. Where bncupy is stricter than torch
(momentum outside [0, 1] is an error), so are these modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ._docstrings import parameters_from
from ._functional import batch_norm_backward, batch_norm_forward

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormFunction", "batch_norm",
           "replace_batch_norms"]


def _detached(t: Any) -> Any:
    """A tensor that DLPack exports (tensors that require grad are refused)."""
    return None if t is None else t.detach()


class BatchNormFunction(torch.autograd.Function):
    """``torch.nn.functional.batch_norm`` computed by bncupy, as a ``torch.autograd.Function``.

    Differentiable in input, weight and bias, once (the backward pass is not itself
    differentiable). Call it through :func:`batch_norm`, or as
    ``BatchNormFunction.apply(input, running_mean, running_var, weight, bias, training,
    momentum, eps)``.

    Parameters
    ----------
    *args
        Taken by ``torch.autograd.Function``'s constructor, which autograd calls, not users.
    **kwargs
        As ``*args``.

    Examples
    --------
    >>> x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    >>> apply = bncupy.torch.BatchNormFunction.apply
    >>> def f(t):
    ...     return apply(t, None, None, None, None, True, 0.1, 1e-5)
    >>> torch.autograd.gradcheck(f, (x,))
    True
    """

    @staticmethod
    def forward(ctx: Any, input: Any, running_mean: Any, running_var: Any, weight: Any,
                bias: Any, training: bool, momentum: float, eps: float) -> Any:
        y, save_mean, save_invstd = batch_norm_forward(
            input.detach(), running_mean, running_var, _detached(weight), _detached(bias),
            training, momentum, eps)
        ctx.save_for_backward(input, weight, save_mean, save_invstd)
        ctx.training = training
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Any) -> tuple[Any, ...]:
        input, weight, save_mean, save_invstd = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = batch_norm_backward(
            grad_output, input.detach(), _detached(weight), save_mean, save_invstd,
            training=ctx.training)
        need = ctx.needs_input_grad
        return (grad_input if need[0] else None, None, None, grad_weight if need[3] else None,
                grad_bias if need[4] else None, None, None, None)


def batch_norm(input: Any, running_mean: Any, running_var: Any, weight: Any = None,
               bias: Any = None, training: bool = False, momentum: float = 0.1,
               eps: float = 1e-5) -> Any:
    """``torch.nn.functional.batch_norm``'s signature and semantics, computed by bncupy, with
    autograd (see :class:`BatchNormFunction`).

    Parameters
    ----------
    input : torch.Tensor
        (N, C, ...) input, on the CPU or a CUDA device.
    running_mean, running_var : torch.Tensor of shape (C,) or None
        Running statistics, updated in place in training.
    weight, bias : torch.Tensor of shape (C,), optional
        Affine parameters (gradients flow to them).
    training : bool
        Normalize with the batch statistics (True) or the running ones.
    momentum : float in [0, 1]
        Weight of the new batch in the running-statistics update.
    eps : float > 0
        Added to the variance.

    Returns
    -------
    torch.Tensor
        Same shape, dtype, device and memory format as ``input``.

    Examples
    --------
    >>> x = torch.randn(8, 3, requires_grad=True)
    >>> running_mean, running_var = torch.zeros(3), torch.ones(3)
    >>> y = bncupy.torch.batch_norm(x, running_mean, running_var, training=True)
    >>> y.sum().backward()
    >>> x.grad.shape
    torch.Size([8, 3])
    """
    return BatchNormFunction.apply(input, running_mean, running_var, weight, bias, training,
                                   momentum, eps)


class _Kernels:
    """The forward pass of ``torch.nn.modules.batchnorm._BatchNorm``, through bncupy.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float
        Added to the variance.
    momentum : float in [0, 1] or None
        Weight of each new batch in the running statistics; None for a cumulative average.
    affine : bool
        Learn ``weight`` and ``bias``.
    track_running_stats : bool
        Keep running statistics and use them in eval mode.
    bias : bool
        With ``affine``, learn ``bias`` too (torch 2.6 and later).
    device : torch.device, optional
        Of the parameters and buffers.
    dtype : torch.dtype, optional
        Of the parameters and buffers.
    """

    def forward(self: Any, input: Any) -> Any:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return batch_norm(input, self.running_mean if use_running else None,
                          self.running_var if use_running else None, self.weight, self.bias,
                          batch_stats, factor, self.eps)


@parameters_from(_Kernels)
class BatchNorm1d(_Kernels, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by bncupy.

    A subclass of ``torch.nn.BatchNorm1d``: the same constructor, parameters, buffers,
    ``state_dict`` and ``repr``.

    Examples
    --------
    >>> layer = bncupy.torch.BatchNorm1d(3)
    >>> isinstance(layer, torch.nn.BatchNorm1d)
    True
    >>> layer(torch.randn(8, 3)).shape
    torch.Size([8, 3])
    """


@parameters_from(_Kernels)
class BatchNorm2d(_Kernels, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by bncupy.

    A subclass of ``torch.nn.BatchNorm2d``: the same constructor, parameters, buffers,
    ``state_dict`` and ``repr``.

    Examples
    --------
    >>> layer = bncupy.torch.BatchNorm2d(3)
    >>> isinstance(layer, torch.nn.BatchNorm2d)
    True
    >>> layer(torch.randn(8, 3, 4, 4)).shape
    torch.Size([8, 3, 4, 4])
    """


@parameters_from(_Kernels)
class BatchNorm3d(_Kernels, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` computed by bncupy.

    A subclass of ``torch.nn.BatchNorm3d``: the same constructor, parameters, buffers,
    ``state_dict`` and ``repr``.

    Examples
    --------
    >>> layer = bncupy.torch.BatchNorm3d(3)
    >>> isinstance(layer, torch.nn.BatchNorm3d)
    True
    >>> layer(torch.randn(8, 3, 2, 2, 2)).shape
    torch.Size([8, 3, 2, 2, 2])
    """


_REPLACEMENTS: dict[Any, Any] = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
                 torch.nn.BatchNorm3d: BatchNorm3d}


def replace_batch_norms(module: torch.nn.Module) -> torch.nn.Module:
    """Swap every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` (itself included) for this
    module's equivalent with the same configuration, state, device, dtype and mode.

    Parameters
    ----------
    module : torch.nn.Module
        A model, changed in place.

    Returns
    -------
    torch.nn.Module
        ``module``, or the replacement when ``module`` itself is a batch norm.

    Examples
    --------
    >>> conv, norm = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)
    >>> model = torch.nn.Sequential(conv, norm)
    >>> model = bncupy.torch.replace_batch_norms(model)  # bncupy's kernels
    >>> type(model[1]).__module__
    'bncupy.torch'
    """
    cls = _REPLACEMENTS.get(type(module))
    if cls is not None:
        reference = module.weight if module.weight is not None else module.running_mean
        factory = {} if reference is None else {"device": reference.device,
                                                "dtype": reference.dtype}
        new = cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.running_mean is not None, bias=module.bias is not None, **factory)
        new.track_running_stats = module.track_running_stats  # may have been toggled
        new.load_state_dict(module.state_dict())
        for name, param in module.named_parameters(recurse=False):
            getattr(new, name).requires_grad_(param.requires_grad)
        return new.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, replace_batch_norms(child))
    return module

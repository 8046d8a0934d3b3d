"""Batch-normalization layers with the constructor, state and semantics of torch.nn.BatchNorm*d."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _renorm
from . import _validation as v
from ._docstrings import parameters_from
from ._functional import _FORWARD_CHECKED, backward, forward, forward_key
from ._interop import accepts
from ._module import _Module, channel_state
from .backends import cupy as cupy_backend
from .backends import dispatch

_ARRAY_NAMES: dict[tuple, tuple[str, ...]] = {}


class _BatchNorm(_Module):
    """Shared implementation of :class:`BatchNorm1d`, :class:`BatchNorm2d` and :class:`BatchNorm3d`.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float
        Added to the variance; finite and > 0.
    momentum : float in [0, 1] or None
        Weight of each new batch in the running statistics; None for a cumulative average.
    affine : bool
        Learn a per-channel scale ``weight`` (gamma, init 1) and shift ``bias`` (beta, init 0).
    track_running_stats : bool
        Keep running statistics and use them in eval mode; otherwise batch statistics always.
        Set after construction it keeps the statistics there are (as torch): training then
        stops (False) updating them; eval mode still normalizes with them.
    dtype : float dtype or None
        The dtype of the parameters and running statistics (inputs may be any float dtype); None
        means float32, as torch's default.
    bias : bool, keyword-only
        With ``affine``, learn the shift ``bias`` too; False keeps only ``weight`` (torch).
    channels_last : bool, keyword-only
        The channel axis is the last one (NHWC, (N, L, C), NDHWC) instead of axis 1.
    activation : None or "relu", keyword-only
        Fused activation: the layer computes ``act(bn(x) + residual)`` in one pass.
    renorm : bool, keyword-only
        Batch Renormalization (Ioffe 2017) in training: the batch statistics are corrected
        towards the running ones by ``r`` (clipped to ``[1/rmax, rmax]``) and ``d`` (clipped to
        ``[-dmax, dmax]``); ``rmax`` and ``dmax`` may be changed between calls (the paper ramps
        them up from 1 and 0). Needs ``track_running_stats``.
    rmax, dmax : float, keyword-only
        The limits of ``r`` (>= 1) and ``d`` (>= 0) with ``renorm``.
    ghost_batch_size : int or None, keyword-only
        Ghost batch norm in training: the batch is split into virtual batches of this many
        samples, each normalized with its own statistics and counted as one batch in the running
        statistics, in order.

    Notes
    -----
    State lives in the array kind of the backend in force at construction and follows each
    input's kind (numpy or cupy) from then on; :meth:`to` moves it explicitly.
    """

    _ndims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, dtype: Any = None,
                 *, bias: bool = True, channels_last: bool = False, activation: str | None = None,
                 renorm: bool = False, rmax: float = 3.0, dmax: float = 5.0,
                 ghost_batch_size: int | None = None) -> None:
        self.num_features = v.check_num_features(num_features)
        self.eps = v.check_eps(eps)
        self.momentum = v.check_momentum(momentum, allow_none=True)
        self.affine = v.check_bool(affine, "affine")
        self.track_running_stats = v.check_bool(track_running_stats, "track_running_stats")
        self.dtype = v.check_dtype(dtype)
        self.has_bias = v.check_bool(bias, "bias") and self.affine
        self.channels_last = v.check_bool(channels_last, "channels_last")
        v.check_activation(activation)
        self.activation = activation
        self.renorm = v.check_bool(renorm, "renorm")
        self.rmax, self.dmax = _renorm.check_limits(rmax, dmax)
        self.ghost_batch_size = None if ghost_batch_size is None else v.check_int(
            ghost_batch_size, "ghost_batch_size", minimum=1)
        if activation is not None and (self.renorm or self.ghost_batch_size is not None):
            raise ValueError("activation cannot be fused with renorm or ghost_batch_size")
        if self.renorm and not self.track_running_stats:
            raise ValueError("renorm needs track_running_stats=True (r and d compare the batch "
                             "with the running statistics)")
        self.training = True
        self._has_running = self.track_running_stats  # buffers stay when it is toggled
        self.weight = self.bias = self.running_mean = self.running_var = None
        self.num_batches_tracked: Any = None
        self._allocate({"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0,
                        "num_batches_tracked": 0}, f"num_features={self.num_features}")
        self.grad_weight: Any = None
        self.grad_bias: Any = None
        self.grad_residual: Any = None
        self._saved: tuple | None = None  # forward (or ghost parts) and its entry

    # ------------------------------------------------------------------ mode and placement
    @property
    def axis(self) -> int:
        return -1 if self.channels_last else 1

    # ------------------------------------------------------------------ computation
    def _check_input(self, x: Any, residual: Any = None) -> str:
        """Check a call's input (and residual) against the layer; returns the array kind."""
        kind = v.check_input(x)
        if residual is not None:
            v.check_same_kind({"input": kind,
                               "residual": v.check_like_input(residual, "residual", x)})
        if self._ndims and x.ndim not in self._ndims:
            expected = " or ".join(f"{n}-D" for n in self._ndims)
            raise ValueError(f"{type(self).__name__} expected {expected} input, got {x.ndim}-D "
                             f"input of shape {tuple(x.shape)}")
        channels = x.shape[self.axis]
        if channels != self.num_features:
            raise ValueError(f"input has {channels} channels on axis {self.axis}, but "
                             f"{type(self).__name__} was built for num_features="
                             f"{self.num_features}")
        return kind

    def _batches(self) -> int:
        return 0 if self.num_batches_tracked is None else int(self.num_batches_tracked)

    def _check_counter(self) -> int:
        """A training call counts one more batch: refuse before it updates anything when the
        int64 counter is full; returns the count."""
        batches = self._batches()
        if batches >= v.MAX_COUNT:
            raise ValueError(f"num_batches_tracked is at its int64 maximum ({v.MAX_COUNT}) and "
                             f"cannot count another batch; reset it with load_state_dict")
        return batches

    def _array_names(self) -> tuple[str, ...]:
        flags = (type(self), self.affine, self.has_bias, self._has_running)
        names = _ARRAY_NAMES.get(flags)
        if names is None:
            names = _ARRAY_NAMES[flags] = super()._array_names()
        return names

    @accepts("x", "residual")
    def __call__(self, x: Any, residual: Any = None) -> Any:
        """Normalize ``x`` (training: batch statistics and running-stat update; eval: running).

        Arrays with ``__dlpack__`` (torch, JAX, ...) are taken too; the output is then of their
        kind, while the layer's state stays NumPy/CuPy.

        Parameters
        ----------
        x : ndarray
            Input of the layer's rank, channels on axis 1 (or last with ``channels_last``).
        residual : ndarray, optional
            ``x``'s shape: the layer returns ``act(bn(x) + residual)``.

        Returns
        -------
        ndarray
            Same shape, dtype, array kind and memory layout as ``x``.

        Raises
        ------
        TypeError
            ``x`` or ``residual`` is not a float array, or they are of different kinds.
        ValueError
            A wrong rank or channel count, or one value per channel in training; the layer's
            state is left as it was.

        Examples
        --------
        >>> layer = bn.BatchNorm1d(3, activation="relu")
        >>> x = np.random.default_rng(0).standard_normal((8, 3), np.float32)
        >>> y = layer(x, residual=np.ones_like(x))
        >>> y.shape, int(layer.num_batches_tracked)
        ((8, 3), 1)
        """
        if self.training and (self.renorm or self.ghost_batch_size is not None):
            return self._call_corrected(x, self._check_input(x, residual))
        use_batch_stats = self.training or self.running_mean is None
        update = self.training and self.track_running_stats and self.running_mean is not None
        tracked = self.running_mean is not None and (update or not self.training)
        # One cached entry answers both the layer's checks of the call and forward's: its key
        # holds the layer's type and width besides the arrays (the state as it is now)
        setting = dispatch.configured_backend()
        owner = (type(self), self.num_features)
        key = forward_key(x, self.running_mean if tracked else None,
                          self.running_var if tracked else None, self.weight, self.bias,
                          residual, use_batch_stats, self.axis, self.activation, setting, owner)
        checked = _FORWARD_CHECKED.get(key)
        if checked is None:
            kind = self._check_input(x, residual)
            if use_batch_stats:
                v.check_count(x, self.axis % x.ndim)
            batches = self._check_counter() if update else 0
            self._follow(kind)  # after every check: a rejected call leaves the state as it was
        else:
            kind = checked.kind
            batches = self._check_counter() if update else 0
            if self.weight is None and not tracked:  # else the key holds the state's types
                self._follow(kind)
        momentum = self._momentum(kind) if update else 0.0
        out = forward(x, self.running_mean if tracked else None,
                      self.running_var if tracked else None, self.weight, self.bias,
                      use_batch_stats, momentum, self.eps, self.axis, self.activation, residual,
                      buffers := cupy_backend.StatBuffers.of(self), owner, checked, setting)
        if update:
            self.num_batches_tracked = np.asarray(batches + 1, np.int64)
        # what the backward pass reads (not y: the layer would keep it alive), and the entry of
        # the call's signature, whose checks vouch for the statistics backward is given
        self._saved = (x, residual, (out.mean, out.save_invstd, out.coefficients),
                       use_batch_stats, checked or _FORWARD_CHECKED.get(key))
        buffers.saved = out.mean
        return out.y

    def _momentum(self, kind: str) -> float:
        """This step's momentum: ``momentum``, or for None the cumulative average's factor
        ``1 / (n + 1)``. That factor is host state: a CUDA graph would replay the captured one,
        so a capture of it is refused."""
        if self.momentum is not None:
            return self.momentum
        if kind == "cupy" and cupy_backend.runtime().is_capturing():
            raise RuntimeError(f"{type(self).__name__} with momentum=None (a cumulative moving "
                               f"average) cannot be captured in a CUDA graph: its factor "
                               f"1/(num_batches_tracked + 1) changes every step on the host, "
                               f"and a replay would repeat the captured one; give the layer a "
                               f"fixed momentum")
        return 1.0 / (self._batches() + 1)

    def _call_corrected(self, x: Any, kind: str) -> Any:
        """Training with renormalization and/or ghost batches: each virtual batch normalized
        (and counted) in turn; every check happens before the first update."""
        axis = self.axis % x.ndim
        parts = ([slice(None)] if self.ghost_batch_size is None
                 else _renorm.ghost_slices(x.shape[0], self.ghost_batch_size))
        for part in parts:
            v.check_count(x[part], axis)
        update = self.track_running_stats
        if update and self._batches() > v.MAX_COUNT - len(parts):
            self._check_counter()
            raise ValueError(f"num_batches_tracked cannot count {len(parts)} more batches")
        self._follow(kind)
        outs = []
        for part in parts:
            if self.renorm:
                out: Any = _renorm.forward(x[part], self.running_mean, self.running_var,
                                           self.weight, self.bias, self._momentum(kind),
                                           self.eps, self.rmax, self.dmax, self.axis)
            else:
                out = forward(x[part], self.running_mean if update else None,
                              self.running_var if update else None, self.weight, self.bias,
                              True, self._momentum(kind) if update else 0.0, self.eps, self.axis)
            if update:
                self.num_batches_tracked = np.asarray(self._batches() + 1, np.int64)
            outs.append((part, out))
        self._saved = (x, None, outs, True, None)
        ys = [out.y for _, out in outs]
        return ys[0] if len(ys) == 1 else dispatch.module_for(kind).xp.concatenate(ys)

    def _backward_corrected(self, grad_output: Any, x: Any, outs: list) -> Any:
        v.check_same_kind({"input": dispatch.array_kind(x) or "numpy",
                           "grad_output": v.check_like_input(grad_output, "grad_output", x)})
        grads, dw, db = [], None, None
        for part, out in outs:
            if isinstance(out, _renorm.RenormForward):
                mean, invstd, r, d = out.saved()
                g, w, b = _renorm.backward(grad_output[part], x[part], self.weight, mean, invstd,
                                           r, d, self.axis, ("mean", "invstd"))
            else:
                g, w, b = backward(grad_output[part], x[part], self.weight, out.mean,
                                   out.save_invstd, True, self.axis, layer=True)
            grads.append(g)
            dw, db = (w, b) if dw is None else (dw + w, db + b)
        if self.affine:
            self.grad_weight = dw
            self.grad_bias = db if self.bias is not None else None
        self.grad_residual = None
        kind = dispatch.array_kind(x) or "numpy"
        return grads[0] if len(grads) == 1 else dispatch.module_for(kind).xp.concatenate(grads)

    @accepts("grad_output")
    def backward(self, grad_output: Any) -> Any:
        """Gradient with respect to the last call's input; sets ``grad_weight``, ``grad_bias``
        and, when that call had a residual, ``grad_residual``.

        Parameters
        ----------
        grad_output : ndarray
            Gradient of the loss with respect to the last call's output.

        Returns
        -------
        ndarray
            Gradient with respect to the last call's input.

        Raises
        ------
        RuntimeError
            If the layer has not been called yet.

        Examples
        --------
        >>> layer = bn.BatchNorm1d(3)
        >>> x = np.random.default_rng(0).standard_normal((8, 3), np.float32)
        >>> dx = layer.backward(2 * layer(x))
        >>> dx.shape, layer.grad_bias.round(5) + 0
        ((8, 3), array([0., 0., 0.], dtype=float32))
        """
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before a forward call")
        x, residual, out, use_batch_stats, origin = self._saved
        if isinstance(out, list):
            return self._backward_corrected(grad_output, x, out)
        mean, invstd, coefficients = out
        fused = (coefficients, residual) if self.activation == "relu" else None
        grads = backward(grad_output, x, self.weight, mean, invstd, use_batch_stats, self.axis,
                         fused=fused, layer=True, origin=origin)
        if self.affine:
            self.grad_weight = grads[1]
            self.grad_bias = grads[2] if self.bias is not None else None
        if residual is None:
            self.grad_residual = None
        else:
            self.grad_residual = grads[3] if fused is not None else grad_output
        return grads[0]

    # ------------------------------------------------------------------ state
    _GRADS = ("grad_weight", "grad_bias", "grad_residual")

    def _state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Kept when ``track_running_stats`` is toggled after construction (as torch)."""
        return channel_state(self.num_features, self.affine, self.has_bias, self._has_running)

    def extra_repr(self) -> str:
        """torch's ``extra_repr``, then bncupy's own options where they are not the default."""
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}"
                f"{f', dtype={self.dtype.name}' if self.dtype != np.float32 else ''}"
                f"{', channels_last=True' if self.channels_last else ''}"
                f"{f', activation={self.activation!r}' if self.activation else ''}"
                f"{f', renorm=True, rmax={self.rmax}, dmax={self.dmax}' if self.renorm else ''}"
                f"{f', ghost_batch_size={self.ghost_batch_size}' if self.ghost_batch_size else ''}")


@parameters_from(_BatchNorm)
class BatchNorm1d(_BatchNorm):
    """Batch normalization over (N, C) or (N, C, L) input ((N, L, C) with ``channels_last``).

    ``torch.nn.BatchNorm1d``'s constructor, defaults, state dict and ``repr``; bncupy's own
    options are keyword-only.

    Examples
    --------
    >>> layer = bn.BatchNorm1d(16, renorm=True, rmax=3.0, dmax=5.0)
    >>> x = np.random.default_rng(0).standard_normal((64, 16), np.float32)
    >>> y = layer(x)
    >>> ghost = bn.BatchNorm1d(16, ghost_batch_size=16)  # 4 batches of 16
    >>> y = ghost(x)
    >>> int(ghost.num_batches_tracked)
    4
    """

    _ndims = (2, 3)


@parameters_from(_BatchNorm)
class BatchNorm2d(_BatchNorm):
    """Batch normalization over (N, C, H, W) input ((N, H, W, C) with ``channels_last``).

    ``torch.nn.BatchNorm2d``'s constructor, defaults, state dict and ``repr``; bncupy's own
    options are keyword-only.

    Examples
    --------
    >>> layer = bn.BatchNorm2d(3)
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4), np.float32)
    >>> y = layer(x)                          # training: batch statistics
    >>> dx = layer.backward(np.ones_like(y))  # sets grad_weight, grad_bias
    >>> y = layer.eval()(x)                   # eval: running statistics
    >>> layer
    BatchNorm2d(3, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
    """

    _ndims = (4,)


@parameters_from(_BatchNorm)
class BatchNorm3d(_BatchNorm):
    """Batch normalization over (N, C, D, H, W) input ((N, D, H, W, C) with ``channels_last``).

    ``torch.nn.BatchNorm3d``'s constructor, defaults, state dict and ``repr``; bncupy's own
    options are keyword-only.

    Examples
    --------
    >>> layer = bn.BatchNorm3d(2, channels_last=True)
    >>> x = np.random.default_rng(0).standard_normal((4, 3, 3, 3, 2), np.float32)
    >>> layer(x).shape
    (4, 3, 3, 3, 2)
    """

    _ndims = (5,)

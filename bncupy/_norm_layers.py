"""LayerNorm, RMSNorm, GroupNorm and InstanceNorm1d/2d/3d with the constructors, state and
semantics of their torch.nn namesakes, and a ``backward`` like the batch-norm layers'."""

from __future__ import annotations

from typing import Any

from . import _norms, _row_norms
from . import _validation as v
from ._docstrings import parameters_from
from ._functional import _caller
from ._functional import backward as _bn_backward
from ._interop import accepts
from ._module import _Module, channel_state
from ._norms import _shaped
from .backends import cupy as cupy_backend
from .backends._common import cast


class _GroupNormalization(_Module):
    """Shared forward/backward bookkeeping: the last call's input and forward, gradients."""

    def _init_grads(self) -> None:
        self.grad_weight: Any = None
        self.grad_bias: Any = None
        self._saved: tuple[Any, Any] | None = None

    def _buffers(self) -> Any:
        """The statistics buffers a forward on the GPU writes (see ``StatBuffers``)."""
        return cupy_backend.StatBuffers.of(self)

    def _remember(self, x: Any, out: Any, buffers: Any) -> None:
        """Keep a forward that succeeded for the backward pass (and its statistics buffer, one
        of the layer's ``buffers``, from the next forward's writes)."""
        self._saved = (x, out)
        buffers.saved = out.saved if isinstance(out, _norms.GroupForward) else out.mean

    def _backward_group(self, grad_output: Any, param_shape: tuple[int, ...],
                        grad_sum: Any = None) -> Any:
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before a forward call")
        x, out = self._saved
        weight = getattr(self, "weight", None)
        if not isinstance(out, _norms.GroupForward):  # normalized with running statistics
            dx, dw, db = _bn_backward(grad_output, x, weight, out.mean, out.save_invstd, False,
                                      self._axis(x), layer=True)
        else:
            if grad_sum is not None:
                v.check_same_kind({"input": out.kind, "grad_prenorm": v.check_like_input(
                    grad_sum, "grad_prenorm", x)})
            dx, dw, db = _norms.group_backward(grad_output, x, out, weight, grad_sum)
            if out.backend.name != out.kind:  # (db None: RMSNorm on the GPU)
                dx, dw, db = (None if a is None else _caller(out.kind, out.backend, a)
                              for a in (dx, dw, db))
        if weight is not None:
            self.grad_weight = cast(_shaped(dw, param_shape), weight.dtype)
        bias = getattr(self, "bias", None)
        if bias is not None:
            self.grad_bias = cast(_shaped(db, param_shape), bias.dtype)
        return dx

    def _axis(self, x: Any) -> int:
        return 1


class _RowNormalization(_GroupNormalization):
    """LayerNorm and RMSNorm: rows of the trailing ``normalized_shape`` dimensions, with the
    fused residual add of pre-norm blocks (see :mod:`._row_norms`)."""

    _rms = False
    normalized_shape: tuple[int, ...]
    eps: Any
    weight: Any
    bias: Any = None

    @accepts("x", "residual")
    def __call__(self, x: Any, residual: Any = None, prenorm: bool = False,
                 residual_in_fp32: bool = False) -> Any:
        """Normalize each row of ``x``'s trailing ``normalized_shape`` dimensions (of
        ``x + residual`` with ``residual``).

        Parameters
        ----------
        x : ndarray, shape (..., ``*normalized_shape``)
            Float input of any array kind bncupy takes.
        residual : ndarray, optional
            ``x``'s shape: the row normalized is the sum ``h = x + residual``.
        prenorm : bool
            Also return ``h`` (``x`` itself without ``residual`` and ``residual_in_fp32``).
        residual_in_fp32 : bool
            Without ``residual``: ``h`` is 16-bit ``x`` converted to float32 (``x`` itself
            for float32 and float64).

        Returns
        -------
        y : ndarray
            Same shape, dtype and array kind as ``x``.
        h : ndarray
            Only with ``prenorm``: the residual sum, the next block's residual.

        Examples
        --------
        >>> ln = bn.LayerNorm(3)
        >>> ln(np.arange(6.0).reshape(2, 3)).round(4)
        array([[-1.2247,  0.    ,  1.2247],
               [-1.2247,  0.    ,  1.2247]])
        >>> y, h = ln(np.ones((2, 3)), residual=np.ones((2, 3)), prenorm=True)
        >>> h
        array([[2., 2., 2.],
               [2., 2., 2.]])
        """
        # A signature forward_rows has checked needs no check of the layer's but prenorm's,
        # and its key holds the types of the layer's parameters: they are of x's kind already
        found = _row_norms.checked_rows(x, self.normalized_shape, self.weight, self.bias,
                                        residual, residual_in_fp32, self._rms)
        if found is None:
            kinds = {"input": v.check_array(x, "input")}
            v.check_float(x, "input")
            _row_norms.check_normalized_shape(self.normalized_shape, x)
            if residual is not None:
                _row_norms._check_residual(residual, x, kinds)
            v.check_bool(residual_in_fp32, "residual_in_fp32")
            v.check_bool(prenorm, "prenorm")
            # after the checks: a rejected call leaves the state where it was
            self._follow(v.check_same_kind(kinds))
        else:
            v.check_bool(prenorm, "prenorm")
            if self.weight is None:  # no parameters in the key
                self._follow(found[0])
        out = _row_norms.forward_rows(x, self.normalized_shape, self.weight, self.bias, self.eps,
                                      rms=self._rms, residual=residual,
                                      residual_in_fp32=residual_in_fp32,
                                      keep=(buffers := self._buffers()), want_sum=True,
                                      found=found)
        self._remember(x, out, buffers)
        return (out.y, _row_norms._sum_out(out, x)) if prenorm else out.y

    @accepts("grad_output", "grad_prenorm")
    def backward(self, grad_output: Any, grad_prenorm: Any = None) -> Any:
        """Gradient with respect to the last call's input (and residual: the same array); sets
        ``grad_weight`` (and ``grad_bias``).

        Parameters
        ----------
        grad_output : ndarray
            Gradient of the loss with respect to the last call's output.
        grad_prenorm : ndarray, optional
            The gradient the returned sum ``h`` received from elsewhere (``prenorm``).

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
        >>> ln = bn.LayerNorm(4)
        >>> x = np.random.default_rng(0).standard_normal((3, 4), np.float32)
        >>> dx = ln.backward(np.ones_like(ln(x)))
        >>> dx.shape, ln.grad_bias
        ((3, 4), array([3., 3., 3., 3.], dtype=float32))
        """
        return self._backward_group(grad_output, self.normalized_shape, grad_prenorm)


class LayerNorm(_RowNormalization):
    """Layer normalization over the trailing ``normalized_shape`` dimensions.

    ``torch.nn.LayerNorm``'s constructor, defaults, state dict and ``repr``; a call may also
    add a residual first (pre-norm transformer blocks).

    Parameters
    ----------
    normalized_shape : int or sequence of int
        The trailing dimensions normalized together.
    eps : float > 0
        Added to the variance.
    elementwise_affine : bool
        Learn ``weight`` (init 1) and, with ``bias``, ``bias`` (init 0) of ``normalized_shape``.
    bias : bool
        With ``elementwise_affine``, learn ``bias`` too.
    dtype : float dtype or None
        Of the parameters (None: float32).

    Examples
    --------
    >>> ln = bn.LayerNorm(768)
    >>> tokens = np.random.default_rng(0).standard_normal((16, 768), np.float32)
    >>> y = ln(tokens)
    >>> dx = ln.backward(np.ones_like(y))    # sets grad_weight, grad_bias
    >>> ln
    LayerNorm((768,), eps=1e-05, elementwise_affine=True, bias=True)
    """

    def __init__(self, normalized_shape: Any, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, dtype: Any = None) -> None:
        self.normalized_shape = _row_norms.check_normalized_shape(normalized_shape)
        self.eps = v.check_eps(eps)
        self.elementwise_affine = v.check_bool(elementwise_affine, "elementwise_affine")
        self.has_bias = v.check_bool(bias, "bias") and self.elementwise_affine
        self.dtype = v.check_dtype(dtype)
        self.training = True
        self.weight: Any = None
        self.bias: Any = None
        self._allocate({"weight": 1.0, "bias": 0.0},
                       f"normalized_shape={self.normalized_shape}")
        self._init_grads()

    def _state_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        if self.elementwise_affine:
            shapes["weight"] = self.normalized_shape
        if self.has_bias:
            shapes["bias"] = self.normalized_shape
        return shapes

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, bias={self.has_bias}")


class RMSNorm(_RowNormalization):
    """Root-mean-square normalization over the trailing ``normalized_shape`` dimensions, as
    ``torch.nn.RMSNorm``: ``y = x / sqrt(mean(x^2) + eps) * weight``.

    ``torch.nn.RMSNorm``'s constructor, defaults, state dict and ``repr``; a call may also
    add a residual first (pre-norm transformer blocks).

    Parameters
    ----------
    normalized_shape : int or sequence of int
        The trailing dimensions normalized together.
    eps : float > 0 or None
        None: the machine epsilon of the input's dtype at each call, as torch.
    elementwise_affine : bool
        Learn ``weight`` (init 1) of ``normalized_shape``.
    dtype : float dtype or None
        Of the parameters (None: float32).

    Examples
    --------
    >>> rms = bn.RMSNorm(4)
    >>> rms(np.array([[1.0, -1.0, 1.0, -1.0]]))
    array([[ 1., -1.,  1., -1.]])
    >>> rms
    RMSNorm((4,), eps=None, elementwise_affine=True)
    """

    _rms = True

    def __init__(self, normalized_shape: Any, eps: float | None = None,
                 elementwise_affine: bool = True, dtype: Any = None) -> None:
        self.normalized_shape = _row_norms.check_normalized_shape(normalized_shape)
        self.eps = None if eps is None else v.check_eps(eps)
        self.elementwise_affine = v.check_bool(elementwise_affine, "elementwise_affine")
        self.dtype = v.check_dtype(dtype)
        self.training = True
        self.weight: Any = None
        self._allocate({"weight": 1.0}, f"normalized_shape={self.normalized_shape}")
        self._init_grads()

    def _state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": self.normalized_shape} if self.elementwise_affine else {}

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class GroupNorm(_GroupNormalization):
    """Group normalization: ``num_groups`` groups of consecutive channels, per sample.

    ``torch.nn.GroupNorm``'s constructor, defaults, state dict and ``repr``.

    Parameters
    ----------
    num_groups : int
        Must divide ``num_channels``.
    num_channels : int
        Number of channels C.
    eps : float > 0
        Added to the variance.
    affine : bool
        Learn per-channel ``weight`` and (with ``bias``) ``bias``.
    bias : bool
        With ``affine``, learn ``bias`` too.
    dtype : float dtype or None
        Of the parameters (None: float32).
    channels_last : bool, keyword-only
        Input (N, ..., C) instead of (N, C, ...).

    Examples
    --------
    >>> gn = bn.GroupNorm(8, 32)
    >>> images = np.random.default_rng(1).standard_normal((4, 32, 8, 8), np.float32)
    >>> y = gn(images)
    >>> dx = gn.backward(np.ones_like(y))    # sets grad_weight, grad_bias
    >>> gn
    GroupNorm(8, 32, eps=1e-05, affine=True, bias=True)
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, bias: bool = True, dtype: Any = None, *,
                 channels_last: bool = False) -> None:
        self.num_channels = v.check_num_features(num_channels, "num_channels")
        self.num_groups = _norms.check_num_groups(num_groups)
        if self.num_channels % self.num_groups:
            raise ValueError(f"num_channels ({self.num_channels}) must be divisible by "
                             f"num_groups ({self.num_groups})")
        self.eps = v.check_eps(eps)
        self.affine = v.check_bool(affine, "affine")
        self.has_bias = v.check_bool(bias, "bias") and self.affine
        self.dtype = v.check_dtype(dtype)
        self.channels_last = v.check_bool(channels_last, "channels_last")
        self.training = True
        self.weight: Any = None
        self.bias: Any = None
        self._allocate({"weight": 1.0, "bias": 0.0}, f"num_channels={self.num_channels}")
        self._init_grads()

    def _state_shapes(self) -> dict[str, tuple[int, ...]]:
        return channel_state(self.num_channels, self.affine, self.has_bias, False)

    @accepts("x")
    def __call__(self, x: Any) -> Any:
        """Normalize each (sample, group) of ``x``.

        Parameters
        ----------
        x : ndarray, shape (N, C, ...), or (N, ..., C) with ``channels_last``
            Float input of any array kind bncupy takes.

        Returns
        -------
        ndarray
            Same shape, dtype and array kind as ``x``.

        Examples
        --------
        >>> x = np.random.default_rng(0).standard_normal((2, 4, 3), np.float32)
        >>> bn.GroupNorm(2, 4)(x).shape
        (2, 4, 3)
        """
        axis = -1 if self.channels_last else 1
        # a signature the forward has checked needs the layer's width checked only (its key
        # holds the parameters' types: they are of x's kind already)
        found = _norms.checked_entry(*_norms.group_norm_signature(
            x, self.num_groups, self.weight, self.bias, axis))
        kind = v.check_input(x) if found is None else found[0]
        if x.shape[axis] != self.num_channels:
            raise ValueError(f"input has {x.shape[axis]} channels on axis {axis}, but GroupNorm "
                             f"was built for num_channels={self.num_channels}")
        if found is None or self.weight is None:  # (no parameters in the key)
            self._follow(kind)
        out = _norms.forward_group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                                        axis, keep=(buffers := self._buffers()), found=found)
        self._remember(x, out, buffers)
        return out.y

    @accepts("grad_output")
    def backward(self, grad_output: Any) -> Any:
        """Gradient with respect to the last call's input; sets ``grad_weight``/``grad_bias``.

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
        >>> layer = bn.GroupNorm(2, 4)
        >>> x = np.random.default_rng(0).standard_normal((2, 4, 3), np.float32)
        >>> dx = layer.backward(np.ones_like(layer(x)))
        >>> dx.shape, layer.grad_bias
        ((2, 4, 3), array([6., 6., 6., 6.], dtype=float32))
        """
        return self._backward_group(grad_output, (self.num_channels,))

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.has_bias}{', channels_last=True' if self.channels_last else ''}")


class _InstanceNorm(_GroupNormalization):
    """Shared implementation of InstanceNorm1d/2d/3d.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float > 0
        Added to the variance.
    momentum : float in [0, 1] or None
        Weight of each batch's average statistics in the running ones; None never updates
        them (as torch).
    affine : bool
        Learn per-channel ``weight`` and (with ``bias``) ``bias``.
    track_running_stats : bool
        Keep running statistics and normalize with them in eval mode.
    bias : bool
        With ``affine``, learn ``bias`` too.
    dtype : float dtype or None
        Of the parameters and running statistics (None: float32).
    channels_last : bool, keyword-only
        Input (N, ..., C) instead of (N, C, ...).
    """

    _ndim = 0  # batched input dimensions; one fewer is unbatched input, as in torch

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False, bias: bool = True,
                 dtype: Any = None, *, channels_last: bool = False) -> None:
        self.num_features = v.check_num_features(num_features)
        self.eps = v.check_eps(eps)
        self.momentum = v.check_momentum(momentum, allow_none=True)
        self.affine = v.check_bool(affine, "affine")
        self.has_bias = v.check_bool(bias, "bias") and self.affine
        self.track_running_stats = v.check_bool(track_running_stats, "track_running_stats")
        self.dtype = v.check_dtype(dtype)
        self.channels_last = v.check_bool(channels_last, "channels_last")
        self._has_running = self.track_running_stats  # buffers stay when it is toggled
        self.training = True
        self.weight: Any = None
        self.bias: Any = None
        self.running_mean: Any = None
        self.running_var: Any = None
        self.num_batches_tracked: Any = None
        self._allocate({"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0,
                        "num_batches_tracked": 0}, f"num_features={self.num_features}")
        self._init_grads()

    def _state_shapes(self) -> dict[str, tuple[int, ...]]:
        return channel_state(self.num_features, self.affine, self.has_bias, self._has_running)

    def _axis(self, x: Any) -> int:
        return -1 if self.channels_last else 1

    def _batched(self, x: Any) -> Any:
        v.check_array(x, "input")
        if getattr(x, "ndim", 0) == self._ndim - 1:  # unbatched, as torch accepts
            return x[None]
        if getattr(x, "ndim", 0) != self._ndim:
            raise ValueError(f"{type(self).__name__} expected {self._ndim - 1}-D (unbatched) or "
                             f"{self._ndim}-D input, got input of shape {tuple(x.shape)}")
        return x

    @accepts("x")
    def __call__(self, x: Any) -> Any:
        """Normalize each (sample, channel) of ``x`` with its own statistics (training, or
        without running statistics) or with the running statistics (eval).

        Parameters
        ----------
        x : ndarray
            Batched (N, C, ...) or unbatched (C, ...) float input; (N, ..., C) with
            ``channels_last``.

        Returns
        -------
        ndarray
            Same shape, dtype and array kind as ``x``.

        Examples
        --------
        >>> x = np.random.default_rng(0).standard_normal((3, 5))  # (C, L)
        >>> bn.InstanceNorm1d(3)(x).shape
        (3, 5)
        """
        batched = x if getattr(x, "ndim", None) == self._ndim else self._batched(x)
        axis = self._axis(batched)
        use_input_stats = self.training or not self.track_running_stats or \
            self.running_mean is None
        momentum = 0.0 if self.momentum is None else self.momentum  # torch: None never updates
        track = self.running_mean is not None  # torch passes the buffers whenever they exist
        # a signature the forward has checked (spatial size included) needs the layer's width
        # checked only (its key holds the state's types: they are of x's kind already)
        found = _norms.checked_entry(*_norms.instance_norm_signature(
            batched, self.running_mean if track else None, self.running_var if track else None,
            self.weight, self.bias, use_input_stats, axis))
        kind = v.check_input(batched) if found is None else found[0]
        if batched.shape[axis] != self.num_features:
            raise ValueError(f"input has {batched.shape[axis]} channels on axis {axis}, but "
                             f"{type(self).__name__} was built for num_features="
                             f"{self.num_features}")
        if found is None:
            if use_input_stats:
                _norms.check_spatial(batched, axis)
            self._follow(kind)
        elif not use_input_stats or (self.weight is None and not track):
            self._follow(kind)  # the entry's checks saw no state (eval: the kinds come later)
        out = _norms.forward_instance_norm(  # the state as it is after _follow
            batched, self.running_mean if track else None, self.running_var if track else None,
            self.weight, self.bias, use_input_stats, momentum, self.eps, axis,
            keep=(buffers := self._buffers()), found=found)
        self._remember(batched, out, buffers)
        return out.y if batched is x else out.y.reshape(x.shape)  # (unbatched input)

    @accepts("grad_output")
    def backward(self, grad_output: Any) -> Any:
        """Gradient with respect to the last call's input; sets ``grad_weight``/``grad_bias``.

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
        >>> layer = bn.InstanceNorm1d(4, affine=True)
        >>> x = np.random.default_rng(0).standard_normal((2, 4, 3), np.float32)
        >>> dx = layer.backward(np.ones_like(layer(x)))
        >>> dx.shape, layer.grad_bias
        ((2, 4, 3), array([6., 6., 6., 6.], dtype=float32))
        """
        if self._saved is not None and getattr(grad_output, "ndim", 0) == self._ndim - 1:
            return self._backward_group(grad_output[None], (self.num_features,))[0]
        return self._backward_group(grad_output, (self.num_features,))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.has_bias}, "
                f"track_running_stats={self.track_running_stats}"
                f"{', channels_last=True' if self.channels_last else ''}")


@parameters_from(_InstanceNorm)
class InstanceNorm1d(_InstanceNorm):
    """Instance normalization over (N, C, L) or unbatched (C, L) input.

    ``torch.nn.InstanceNorm1d``'s constructor, defaults (``affine=False``,
    ``track_running_stats=False``), state dict and ``repr``.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((4, 3, 10), np.float32)
    >>> y = bn.InstanceNorm1d(3)(x)
    >>> bool(np.allclose(y.mean(axis=2), 0, atol=1e-5))
    True
    """

    _ndim = 3


@parameters_from(_InstanceNorm)
class InstanceNorm2d(_InstanceNorm):
    """Instance normalization over (N, C, H, W) or unbatched (C, H, W) input.

    ``torch.nn.InstanceNorm2d``'s constructor, defaults (``affine=False``,
    ``track_running_stats=False``), state dict and ``repr``.

    Examples
    --------
    >>> inorm = bn.InstanceNorm2d(32, affine=True, track_running_stats=True)
    >>> list(inorm.state_dict())
    ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    >>> images = np.random.default_rng(1).standard_normal((4, 32, 8, 8), np.float32)
    >>> inorm(images).shape
    (4, 32, 8, 8)
    """

    _ndim = 4


@parameters_from(_InstanceNorm)
class InstanceNorm3d(_InstanceNorm):
    """Instance normalization over (N, C, D, H, W) or unbatched (C, D, H, W) input.

    ``torch.nn.InstanceNorm3d``'s constructor, defaults (``affine=False``,
    ``track_running_stats=False``), state dict and ``repr``.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 4, 4, 4), np.float32)
    >>> bn.InstanceNorm3d(3)(x).shape
    (2, 3, 4, 4, 4)
    """

    _ndim = 5

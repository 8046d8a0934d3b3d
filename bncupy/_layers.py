"""Batch-normalization layers with the constructor, state and semantics of torch.nn.BatchNorm*d."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from . import _validation as v
from ._functional import _Forward, backward, forward, relu_grad
from ._interop import accepts, is_foreign, to_native
from .backends import dispatch

_VECTORS = ("weight", "bias", "running_mean", "running_var")


class IncompatibleKeys(NamedTuple):
    """What :meth:`_BatchNorm.load_state_dict` returns, as torch's ``load_state_dict``."""

    missing_keys: list[str]
    unexpected_keys: list[Any]


def _counter(value: Any, arg: str) -> int:
    """``num_batches_tracked`` from a state dict: a Python int or a 0-d integer array."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        count = int(value)
    else:
        v.check_array(value, arg)
        if value.dtype.kind not in "iu":
            raise TypeError(f"{arg} must be an int or have an integer dtype, got {value.dtype}")
        if value.shape != ():
            raise ValueError(f"{arg} must be an int or a 0-d array, got shape {value.shape}")
        count = int(value)
    if not 0 <= count <= np.iinfo(np.int64).max:
        raise ValueError(f"{arg} must be a count in [0, 2**63 - 1] (int64), got {count}")
    return count


class _BatchNorm:
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
        dtype of the parameters and running statistics (inputs may be any float dtype); None
        is float32, as torch's default.
    bias : bool, keyword-only
        With ``affine``, learn the shift ``bias`` too; False keeps only ``weight`` (torch).
    channels_last : bool, keyword-only
        The channel axis is the last one (NHWC, (N, L, C), NDHWC) instead of axis 1.
    activation : None or "relu", keyword-only
        Fused activation: the layer computes ``act(bn(x) + residual)`` in one pass.

    Notes
    -----
    State lives in the array kind of the backend in force at construction and follows each
    input's kind (numpy or cupy) from then on; :meth:`to` moves it explicitly.
    """

    _ndims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, dtype: Any = None,
                 *, bias: bool = True, channels_last: bool = False,
                 activation: str | None = None) -> None:
        self.num_features = v.check_num_features(num_features)
        self.eps = v.check_eps(eps)
        self.momentum = v.check_momentum(momentum, allow_none=True)
        self.affine = v.check_bool(affine, "affine")
        self.track_running_stats = v.check_bool(track_running_stats, "track_running_stats")
        self.dtype = v.check_dtype(np.float32 if dtype is None else dtype)
        use_bias = v.check_bool(bias, "bias")
        self.channels_last = v.check_bool(channels_last, "channels_last")
        v.check_activation(activation)
        self.activation = activation
        self.training = True
        xp = dispatch.module_for(dispatch.get_backend()).xp
        c = self.num_features
        self.weight = xp.ones(c, self.dtype) if self.affine else None
        self.bias = xp.zeros(c, self.dtype) if self.affine and use_bias else None
        self.running_mean = xp.zeros(c, self.dtype) if self.track_running_stats else None
        self.running_var = xp.ones(c, self.dtype) if self.track_running_stats else None
        self.num_batches_tracked = (np.zeros((), np.int64) if self.track_running_stats else None)
        self.grad_weight: Any = None
        self.grad_bias: Any = None
        self.grad_residual: Any = None
        self._saved: tuple[Any, Any, _Forward, bool] | None = None

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0, in place (when the
        layer tracks running statistics, as torch)."""
        if self.track_running_stats and self.running_mean is not None:
            for name, value in (("running_mean", 0), ("running_var", 1)):
                getattr(self, name)[...] = value
            self.num_batches_tracked = np.zeros((), np.int64)

    def reset_parameters(self) -> None:
        """:meth:`reset_running_stats`, and ``weight`` 1 and ``bias`` 0, in place."""
        self.reset_running_stats()
        if self.weight is not None:
            self.weight[...] = 1
        if self.bias is not None:
            self.bias[...] = 0

    # ------------------------------------------------------------------ mode and placement
    @property
    def axis(self) -> int:
        return -1 if self.channels_last else 1

    def train(self, mode: bool = True) -> _BatchNorm:
        """Set training mode (batch statistics) or, with ``mode=False``, eval mode."""
        self.training = v.check_bool(mode, "mode")
        return self

    def eval(self) -> _BatchNorm:
        """Set eval mode: normalize with the running statistics."""
        return self.train(False)

    def to(self, kind: str) -> _BatchNorm:
        """Move parameters and statistics to ``"numpy"`` or ``"cupy"`` arrays; returns self."""
        if kind not in ("numpy", "cupy"):
            raise ValueError(f"kind must be 'numpy' or 'cupy', got {kind!r}")
        if kind == "cupy":
            dispatch.backend_for("cupy")  # raises BackendUnavailableError when it cannot run
        module = dispatch.module_for(kind)
        for name in _VECTORS + ("grad_weight", "grad_bias", "grad_residual"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, module.asarray(value))
        return self

    # ------------------------------------------------------------------ computation
    def _check_input(self, x: Any) -> str:
        kind = v.check_input(x)
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

    def _state_kind(self) -> str:
        return dispatch.array_kind(self.running_mean if self.weight is None else self.weight) \
            or "numpy"

    @accepts("x", "residual")
    def __call__(self, x: Any, residual: Any = None) -> Any:
        """Normalize ``x`` (training: batch statistics and running-stat update; eval: running).

        With ``residual`` (``x``'s shape) the layer returns ``act(bn(x) + residual)``. Arrays
        with ``__dlpack__`` (torch, JAX, ...) are taken too; the output is then of their kind,
        while the layer's state stays NumPy/CuPy.
        """
        kind = self._check_input(x)
        if (self.weight is not None or self.running_mean is not None) and \
                self._state_kind() != kind:
            self.to(kind)
        use_batch_stats = self.training or self.running_mean is None
        update = self.training and self.track_running_stats
        if not update:
            momentum = 0.0
        elif self.momentum is None:  # cumulative moving average
            momentum = 1.0 / (self._batches() + 1)
        else:
            momentum = self.momentum
        tracked = self.running_mean is not None and (update or not self.training)
        out = forward(x, self.running_mean if tracked else None,
                      self.running_var if tracked else None, self.weight, self.bias,
                      use_batch_stats, momentum, self.eps, self.axis, self.activation, residual)
        if update and self.num_batches_tracked is not None:
            self.num_batches_tracked = np.asarray(self._batches() + 1, np.int64)
        self._saved = (x, residual, out._replace(y=None), use_batch_stats)
        return out.y

    @accepts("grad_output")
    def backward(self, grad_output: Any) -> Any:
        """Gradient with respect to the last call's input; sets ``grad_weight``, ``grad_bias``
        and, when that call had a residual, ``grad_residual``.

        Raises
        ------
        RuntimeError
            If the layer has not been called yet.
        """
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before a forward call")
        x, residual, out, use_batch_stats = self._saved
        if self.activation == "relu":
            grad_output = relu_grad(grad_output, x, residual, out, self.axis)
        grad_input, grad_weight, grad_bias = backward(
            grad_output, x, self.weight, out.mean, out.save_invstd, use_batch_stats, self.axis)
        if self.affine:
            self.grad_weight = grad_weight
            self.grad_bias = grad_bias if self.bias is not None else None
        self.grad_residual = None if residual is None else grad_output
        return grad_input

    # ------------------------------------------------------------------ state
    def _state_keys(self) -> tuple[str, ...]:
        """The state this layer has: kept when ``track_running_stats`` is toggled (torch)."""
        keys = tuple(key for key in ("weight", "bias") if getattr(self, key) is not None)
        if self.running_mean is not None:
            keys += ("running_mean", "running_var", "num_batches_tracked")
        return keys

    def state_dict(self) -> dict[str, Any]:
        """Copies of the state under torch's keys: weight, bias, running_mean, running_var,
        num_batches_tracked (the ones this layer has)."""
        return {key: getattr(self, key).copy() for key in self._state_keys()}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True,
                        ) -> IncompatibleKeys:
        """Load a :meth:`state_dict`, torch's included; all or nothing.

        Values may be NumPy or CuPy arrays or any array with ``__dlpack__`` (torch tensors), of
        any float dtype; ``num_batches_tracked`` a 0-d integer array or a Python int. A state
        without ``num_batches_tracked`` (a checkpoint from before torch added it) keeps the
        layer's count, as torch: 0 for a new layer.

        Parameters
        ----------
        state : mapping
            Torch's keys: weight, bias, running_mean, running_var, num_batches_tracked.
        strict : bool
            Require exactly this layer's keys. With False, state the mapping lacks keeps its
            value and keys the layer does not have are ignored (as torch).

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``, as torch returns them.

        Raises
        ------
        TypeError
            ``state`` is not a mapping, or a value is not an array of a suitable dtype.
        ValueError
            Missing or unexpected keys (``strict``), a wrong shape, or a counter outside int64.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        strict = v.check_bool(strict, "strict")
        expected = self._state_keys()
        given = dict(state)
        if "num_batches_tracked" in expected:  # torch: checkpoints before the counter existed
            given.setdefault("num_batches_tracked", self._batches())
        missing = [key for key in expected if key not in given]
        unexpected = [key for key in state if key not in expected]
        if strict and (missing or unexpected):
            raise ValueError(f"state keys do not match {type(self).__name__}: missing "
                             f"{sorted(missing)}, unexpected {sorted(map(str, unexpected))} "
                             f"(strict=False loads the keys that match)")
        module = dispatch.module_for(self._state_kind())
        loaded: dict[str, Any] = {}
        for key in expected:
            if key not in given:
                continue
            arg = f"state[{key!r}]"
            value = to_native(given[key], arg) if is_foreign(given[key]) else given[key]
            if key == "num_batches_tracked":
                loaded[key] = np.asarray(_counter(value, arg), np.int64)
            else:
                v.check_channel_vector(value, arg, self.num_features)
                loaded[key] = value
        for key in loaded.keys() - {"num_batches_tracked"}:
            loaded[key] = module.asarray(loaded[key]).astype(self.dtype)
        for key, value in loaded.items():
            setattr(self, key, value)
        return IncompatibleKeys(missing, unexpected)

    def extra_repr(self) -> str:
        """torch's ``extra_repr``, then bncupy's own options where they are not the default."""
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}"
                f"{f', dtype={self.dtype.name}' if self.dtype != np.float32 else ''}"
                f"{', channels_last=True' if self.channels_last else ''}"
                f"{f', activation={self.activation!r}' if self.activation else ''}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class BatchNorm1d(_BatchNorm):
    """Batch normalization over (N, C) or (N, C, L) input ((N, L, C) with ``channels_last``)."""

    _ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalization over (N, C, H, W) input ((N, H, W, C) with ``channels_last``)."""

    _ndims = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch normalization over (N, C, D, H, W) input ((N, D, H, W, C) with ``channels_last``)."""

    _ndims = (5,)

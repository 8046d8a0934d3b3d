"""Folding an eval-mode batch norm into the preceding convolution or linear layer."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _validation as v
from ._interop import accepts
from ._layers import _BatchNorm
from .backends import dispatch
from .backends._common import cast


@accepts("weight", "bias")
def fold_into(weight: Any, bias: Any, layer: _BatchNorm) -> tuple[Any, Any]:
    """Weights and bias of a conv/linear layer that already includes ``layer`` in eval mode.

    ``bn(conv(x, W, b)) == conv(x, W', b')`` with ``W' = W * s`` (per output channel) and
    ``b' = (b - running_mean) * s + beta``, ``s = gamma / sqrt(running_var + eps)``.

    Parameters
    ----------
    weight : ndarray, shape (O, I, ...) or (O, I)
        Convolution weight in any (O, I, kernel...) layout, or a linear layer's weight.
    bias : ndarray of shape (O,) or None
        The layer's bias (zero when None).
    layer : BatchNorm1d, BatchNorm2d or BatchNorm3d
        In eval mode, with running statistics and no fused activation; O must equal
        ``layer.num_features``.

    Returns
    -------
    weight, bias : ndarray
        New arrays of ``weight``'s kind and dtype; the inputs are not modified.

    Raises
    ------
    TypeError
        ``layer`` is not a batch-norm layer, or ``weight``/``bias`` are not float arrays of
        one kind.
    ValueError
        ``layer`` is in training mode, has no running statistics or has a fused activation,
        or the shapes do not match.

    Examples
    --------
    >>> layer = bn.BatchNorm2d(3)
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4))
    >>> y = layer(x)                   # training: updates the running statistics
    >>> conv_w = np.ones((3, 2, 3, 3), np.float32)
    >>> w2, b2 = bn.fold_into(conv_w, None, layer.eval())
    >>> w2.shape, b2.shape, w2.dtype
    ((3, 2, 3, 3), (3,), dtype('float32'))
    """
    if not isinstance(layer, _BatchNorm):
        raise TypeError(f"layer must be a BatchNorm1d/2d/3d, got {type(layer).__name__}")
    if not layer.track_running_stats:
        raise ValueError("layer has no running statistics (track_running_stats=False): "
                         "it normalizes with batch statistics and cannot be folded")
    if layer.activation is not None:
        raise ValueError(f"layer has a fused activation ({layer.activation!r}), which cannot be "
                         "folded into a linear weight")
    kinds = {"weight": v.check_array(weight, "weight")}
    v.check_float(weight, "weight")
    if weight.ndim < 2:
        raise ValueError(f"weight must have shape (O, I, ...) or (O, I), got {weight.shape}")
    if weight.shape[0] != layer.num_features:
        raise ValueError(f"weight has {weight.shape[0]} output channels but the layer has "
                         f"num_features={layer.num_features}")
    if bias is not None:
        kinds["bias"] = v.check_channel_vector(bias, "bias", layer.num_features)
    kind = v.check_same_kind(kinds)
    if layer.training:
        raise ValueError("layer is in training mode, where it normalizes with batch statistics: "
                         "call layer.eval() before folding its running statistics")
    xp = dispatch.module_for(kind).xp
    to_kind = dispatch.module_for(kind).asarray

    def f64(a: Any) -> Any:
        return to_kind(a).astype(np.float64)

    scale = 1.0 / xp.sqrt(f64(layer.running_var) + layer.eps)
    if layer.weight is not None:
        scale = scale * f64(layer.weight)
    shift = -f64(layer.running_mean) * scale
    if bias is not None:
        shift = shift + f64(bias) * scale
    if layer.bias is not None:
        shift = shift + f64(layer.bias)
    folded = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    return cast(folded, weight.dtype), cast(shift, weight.dtype)

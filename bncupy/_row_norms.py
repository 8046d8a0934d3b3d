"""Functional LayerNorm and RMSNorm with torch's signatures and semantics, and the fused
residual add of transformer pre-norm blocks.

Both normalize each row of the trailing ``normalized_shape`` dimensions on the row engine the
normalizations over groups share (:mod:`._norms`); RMSNorm is LayerNorm about 0 instead of the
row's mean, without a bias. The residual add follows flash-attn's ``layer_norm_fn`` /
``rms_norm_fn``: with ``residual``, the row normalized is ``h = x + residual``, added in float32
(float64 for float64 input) and rounded to the residual stream's dtype (``residual``'s, or float32
with ``residual_in_fp32`` and no residual); ``prenorm=True`` also returns ``h``, the next block's
residual. On the GPU the sum, the statistics and the output are one pass over memory: ``x`` and
``residual`` read once, ``y`` (and ``h``) written once.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from . import _validation as v
from ._docstrings import parameters_from
from ._functional import _backend, _caller
from ._interop import accepts
from ._norms import (
    _CHECKED,
    GroupForward,
    _as_they_are,
    _backward,
    _check_array,
    _check_vector,
    _checked,
    _checked_key,
    _flat,
    _run_forward,
    _stats_out,
)
from .backends._groups import GroupLayout

_FLOAT32 = np.dtype(np.float32)


def check_normalized_shape(normalized_shape: Any, input: Any = None) -> tuple[int, ...]:
    """``normalized_shape`` as a tuple (an int is one dimension, as in torch), matched against
    the trailing dimensions of ``input`` when given."""
    items = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else \
        normalized_shape
    if isinstance(normalized_shape, (str, bytes)) or not hasattr(items, "__iter__"):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got "
                        f"{type(normalized_shape).__name__}")
    shape = tuple(items)
    if not shape or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool)
                            for d in shape):
        raise TypeError(f"normalized_shape must be an int or a non-empty sequence of ints, got "
                        f"{normalized_shape!r}")
    shape = tuple(int(d) for d in shape)
    if min(shape) < 0:
        raise ValueError(f"normalized_shape must not have negative sizes, got {shape}")
    if input is not None and (input.ndim < len(shape)
                              or tuple(input.shape[input.ndim - len(shape):]) != shape):
        raise ValueError(f"normalized_shape {shape} must match the trailing dimensions of input, "
                         f"got input of shape {tuple(input.shape)}")
    return shape


def _ndim(normalized_shape: Any) -> int:
    """Dimensions of a checked ``normalized_shape``."""
    return 1 if isinstance(normalized_shape, numbers.Integral) else len(normalized_shape)


def _rows_layout(input: Any, shape: tuple[int, ...]) -> GroupLayout:
    size = int(np.prod(shape, dtype=np.int64))
    rows = int(np.prod(input.shape[:input.ndim - len(shape)], dtype=np.int64))
    return GroupLayout("rows", rows, size)


def _shape_key(normalized_shape: Any) -> Any:
    return tuple(normalized_shape) if type(normalized_shape) is list else normalized_shape


def _check_residual(residual: Any, input: Any, kinds: dict[str, str]) -> None:
    """``residual``: input's shape, and input's dtype or (16-bit input) a float32 stream."""
    kinds["residual"] = v.check_like_input(residual, "residual", input)
    allowed = (input.dtype, _FLOAT32) if input.dtype.itemsize == 2 else (input.dtype,)
    if residual.dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise TypeError(f"residual must have dtype {names} (input's, or a float32 residual "
                        f"stream for 16-bit input), got {residual.dtype}")


def _stream(input: Any, residual: Any, residual_in_fp32: bool) -> Any:
    """The residual stream's dtype: ``residual``'s; float32 with ``residual_in_fp32``, no
    residual and 16-bit input; None when ``h`` is the input itself."""
    if residual is not None:
        return residual.dtype
    return _FLOAT32 if residual_in_fp32 and input.dtype.itemsize == 2 else None


def _eps(eps: Any, input: Any, rms: bool) -> float:
    if type(eps) is float and 0.0 < eps < math.inf:  # the usual eps, without a call
        return eps
    if eps is None and rms:  # torch: the machine epsilon of the input's dtype
        return float(np.finfo(input.dtype).eps)
    return v.check_eps(eps)


def _signature(input: Any, normalized_shape: Any, weight: Any, bias: Any, residual: Any,
               residual_in_fp32: Any, rms: bool) -> tuple[str, tuple, tuple]:
    """The tag, arrays and options a :func:`forward_rows` call is checked and cached by."""
    return ("rms_norm" if rms else "layer_norm", (input, weight, bias, residual),
            (_shape_key(normalized_shape), residual_in_fp32))


def checked_rows(input: Any, normalized_shape: Any, weight: Any, bias: Any, residual: Any,
                 residual_in_fp32: Any, rms: bool) -> tuple | None:
    """The entry of a :func:`forward_rows` call signature that passed its checks, or None."""
    return _CHECKED.get(_checked_key(*_signature(input, normalized_shape, weight, bias,
                                                 residual, residual_in_fp32, rms)))


def forward_rows(input: Any, normalized_shape: Any, weight: Any, bias: Any, eps: Any, *,
                 rms: bool, residual: Any = None, residual_in_fp32: Any = False,
                 keep: Any = True, want_sum: bool = False,
                 found: tuple | None = None) -> GroupForward:
    """Validated LayerNorm (RMSNorm with ``rms``) on the resolved backend; ``want_sum``: keep
    the residual sum in the result (``.sum``) whenever one is formed. ``keep``: see
    :func:`._functional.forward`; ``found``: the call's :func:`checked_rows`, when the caller
    has it."""
    def check() -> tuple:
        kinds: dict[str, str] = {}
        _check_array(input, "input", kinds)
        shape = check_normalized_shape(normalized_shape, input)
        _check_vector(weight, "weight", shape, kinds, "normalized_shape")
        if not rms:
            _check_vector(bias, "bias", shape, kinds, "normalized_shape")
        if residual is not None:
            _check_residual(residual, input, kinds)
        fp32 = v.check_bool(residual_in_fp32, "residual_in_fp32")
        _eps(eps, input, rms)
        kind = v.check_same_kind(kinds)
        # the arrays go to the backend as they are: its own, contiguous, parameters flat
        direct = len(shape) == 1 and _as_they_are(_backend(kind), kind,
                                                  (input, residual, weight, bias))
        return kind, _rows_layout(input, shape), fp32, direct

    if found is None:
        (kind, lay, fp32, direct), be = _checked(*_signature(
            input, normalized_shape, weight, bias, residual, residual_in_fp32, rms), check)
    else:
        (kind, lay, fp32, direct), be = found, _backend(found[0])
    stream = _stream(input, residual, fp32)
    if not direct:
        weight, bias = _flat(be, weight), _flat(be, bias)
    return _run_forward(be, kind, input, lay, (lay.n, lay.c), weight, bias,
                        _eps(eps, input, rms), keep=keep, rms=rms, residual=residual,
                        sum_dtype=stream if want_sum else None, direct=direct)


def _sum_out(out: GroupForward, input: Any) -> Any:
    """The residual sum ``h`` in the caller's kind and input's shape (``input`` itself when no
    sum was formed)."""
    if out.sum is None:
        return input
    return _caller(out.kind, out.backend, out.sum.reshape(input.shape))


def _rows_stats(out: GroupForward, input: Any, normalized_shape: Any, value: Any) -> Any:
    batch = tuple(input.shape[:input.ndim - _ndim(normalized_shape)])
    return _stats_out(out.kind, out.backend, value, batch, input.dtype)


# ------------------------------------------------------------------------------ LayerNorm

@accepts("input", "weight", "bias", "residual")
def layer_norm_forward(input: Any, normalized_shape: Any, weight: Any = None, bias: Any = None,
                       eps: float = 1e-5, *, residual: Any = None,
                       residual_in_fp32: bool = False) -> tuple[Any, ...]:
    """Layer normalization that also returns the statistics its backward pass needs.

    Parameters
    ----------
    input : ndarray, shape (..., ``*normalized_shape``)
        A float16, bfloat16, float32 or float64 array; never modified.
    normalized_shape : int or sequence of int
        The trailing dimensions normalized together (one row per leading index).
    weight, bias : ndarray of shape normalized_shape, optional
        Elementwise affine parameters (1 and 0 when None).
    eps : float > 0
        Added to the variance.
    residual : ndarray, optional, keyword-only
        Added to ``input`` first: the row normalized is ``h = input + residual`` in the
        residual's dtype (input's, or float32 for 16-bit input).
    residual_in_fp32 : bool, keyword-only
        Without ``residual``: ``h`` is 16-bit ``input`` converted to float32 (``input`` itself
        for float32 and float64).

    Returns
    -------
    y : ndarray
        Same shape, dtype and array kind as ``input``.
    mean, rstd : ndarray, shape input.shape[:-len(normalized_shape)]
        Per-row mean and ``1/sqrt(var + eps)`` of ``h`` (float32 for 16-bit and float32 input,
        float64 for float64), as torch's ``native_layer_norm``.
    h : ndarray
        Only with ``residual``, or ``residual_in_fp32`` on 16-bit input: the sum normalized,
        to be passed as the backward pass's ``input`` (and the next block's residual).

    Raises
    ------
    TypeError
        An argument is not a float array, or the arrays are of different kinds.
    ValueError
        ``normalized_shape`` does not match the trailing dimensions of ``input``, ``weight``,
        ``bias`` or ``residual`` has the wrong shape, or ``eps`` is not finite and > 0.

    Examples
    --------
    >>> tokens = np.random.default_rng(0).standard_normal((16, 768), np.float32)
    >>> y, mean, rstd = bn.layer_norm_forward(tokens, 768)
    >>> y.shape, mean.shape, rstd.dtype
    ((16, 768), (16,), dtype('float32'))
    >>> stream = np.ones((16, 768), np.float32)                   # a residual stream
    >>> y, mean, rstd, h = bn.layer_norm_forward(tokens, 768, residual=stream)
    >>> np.array_equal(h, tokens + stream)
    True
    """
    out = forward_rows(input, normalized_shape, weight, bias, eps, rms=False, residual=residual,
                       residual_in_fp32=residual_in_fp32, want_sum=True)
    stats = (_rows_stats(out, input, normalized_shape, out.mean),
             _rows_stats(out, input, normalized_shape, out.invstd))
    return (out.y, *stats) if out.sum is None else (out.y, *stats, _sum_out(out, input))


@accepts("input", "weight", "bias", "residual")
@parameters_from(layer_norm_forward)
def layer_norm(input: Any, normalized_shape: Any, weight: Any = None, bias: Any = None,
               eps: float = 1e-5, *, residual: Any = None, prenorm: bool = False,
               residual_in_fp32: bool = False) -> Any:
    """Layer normalization with the signature and semantics of
    ``torch.nn.functional.layer_norm``.

    As :func:`layer_norm_forward`, without the statistics.

    Parameters
    ----------
    prenorm : bool, keyword-only
        Also return the residual sum ``h`` (``input`` itself without ``residual`` and
        ``residual_in_fp32``), as flash-attn's ``layer_norm_fn``.

    Returns
    -------
    y : ndarray
        Same shape, dtype and array kind as ``input``.
    h : ndarray
        Only with ``prenorm``: the residual sum, the next block's residual.

    Examples
    --------
    >>> x = np.arange(6.0).reshape(2, 3)
    >>> bn.layer_norm(x, (3,)).round(4)
    array([[-1.2247,  0.    ,  1.2247],
           [-1.2247,  0.    ,  1.2247]])
    >>> y, h = bn.layer_norm(x, 3, residual=np.ones_like(x), prenorm=True)
    >>> h
    array([[1., 2., 3.],
           [4., 5., 6.]])
    """
    prenorm = v.check_bool(prenorm, "prenorm")
    out = forward_rows(input, normalized_shape, weight, bias, eps, rms=False, residual=residual,
                       residual_in_fp32=residual_in_fp32, keep=False, want_sum=prenorm)
    return (out.y, _sum_out(out, input)) if prenorm else out.y


@accepts("grad_output", "input", "mean", "rstd", "weight", "grad_prenorm")
def layer_norm_backward(grad_output: Any, input: Any, normalized_shape: Any, mean: Any,
                        rstd: Any, weight: Any = None, *, grad_prenorm: Any = None,
                        ) -> tuple[Any, Any, Any]:
    """Gradients of :func:`layer_norm_forward` with respect to input, weight and bias.

    After a residual add, ``input`` is the sum ``h`` the forward pass returned, and the input
    gradient is that of ``x`` and of ``residual`` alike.

    Parameters
    ----------
    grad_output : ndarray
        Gradient of the loss with respect to the output; same shape as ``input``.
    input : ndarray
        The forward pass's input, or the sum ``h`` it returned after a residual add.
    normalized_shape : int or sequence of int
        As in the forward pass.
    mean, rstd : ndarray
        What the forward pass returned (or more precise ones).
    weight : ndarray, optional
        The forward pass's weight (1 when None).
    grad_prenorm : ndarray, optional, keyword-only
        The gradient ``h`` received from its other consumers (``prenorm``), added to the
        input gradient.

    Returns
    -------
    grad_input : ndarray
        Same shape, dtype and array kind as ``input``.
    grad_weight, grad_bias : ndarray
        Of ``normalized_shape``.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((4, 8))
    >>> y, mean, rstd = bn.layer_norm_forward(x, 8)
    >>> dy = np.ones_like(y)
    >>> dx, dweight, dbias = bn.layer_norm_backward(dy, x, 8, mean, rstd)
    >>> dx.shape, dbias
    ((4, 8), array([4., 4., 4., 4., 4., 4., 4., 4.]))
    """
    return _backward(grad_output, input, mean, rstd, weight, False, "layer_norm_backward",
                     (_shape_key(normalized_shape),), _rows_check(input, normalized_shape),
                     grad_sum=grad_prenorm)


def _rows_check(input: Any, normalized_shape: Any) -> Any:
    """The ``layout()`` of :func:`._norms._backward` for rows."""
    def layout() -> tuple:
        shape = check_normalized_shape(normalized_shape, input)
        lay = _rows_layout(input, shape)
        batch = tuple(input.shape[:input.ndim - len(shape)])
        return (lay, (lay.n, lay.c), (batch, "input's leading dimensions"),
                (shape, "normalized_shape"))
    return layout


# ------------------------------------------------------------------------------ RMSNorm

@accepts("input", "weight", "residual")
@parameters_from(layer_norm_forward)
def rms_norm_forward(input: Any, normalized_shape: Any, weight: Any = None, eps: Any = None, *,
                     residual: Any = None, residual_in_fp32: bool = False) -> tuple[Any, ...]:
    """Root-mean-square normalization that also returns what its backward pass needs:
    ``y = input / sqrt(mean(input^2) + eps) * weight`` over the trailing dimensions.

    Parameters
    ----------
    weight : ndarray of shape normalized_shape, optional
        Elementwise scale (1 when None).
    eps : float > 0 or None
        None: the machine epsilon of input's dtype, as torch.

    Returns
    -------
    y : ndarray
        Same shape, dtype and array kind as ``input``.
    rstd : ndarray, shape input.shape[:-len(normalized_shape)]
        ``1/sqrt(mean(h^2) + eps)`` per row (float32, float64 for float64 input).
    h : ndarray
        Only with ``residual``, or ``residual_in_fp32`` on 16-bit input: the sum normalized.

    Raises
    ------
    TypeError
        An argument is not a float array, or the arrays are of different kinds.
    ValueError
        ``normalized_shape`` does not match the trailing dimensions of ``input``, ``weight``
        or ``residual`` has the wrong shape, or ``eps`` is not finite and > 0.

    Examples
    --------
    >>> x = np.array([[3.0, -4.0], [1.0, 1.0]])
    >>> y, rstd = bn.rms_norm_forward(x, 2)
    >>> y.round(4), rstd.round(4)
    (array([[ 0.8485, -1.1314],
           [ 1.    ,  1.    ]]), array([0.2828, 1.    ]))
    """
    out = forward_rows(input, normalized_shape, weight, None, eps, rms=True, residual=residual,
                       residual_in_fp32=residual_in_fp32, want_sum=True)
    rstd = _rows_stats(out, input, normalized_shape, out.invstd)
    return (out.y, rstd) if out.sum is None else (out.y, rstd, _sum_out(out, input))


@accepts("input", "weight", "residual")
@parameters_from(rms_norm_forward, layer_norm)
def rms_norm(input: Any, normalized_shape: Any, weight: Any = None, eps: Any = None, *,
             residual: Any = None, prenorm: bool = False, residual_in_fp32: bool = False) -> Any:
    """RMS normalization with the signature and semantics of ``torch.nn.functional.rms_norm``.

    As :func:`rms_norm_forward`, without the statistics.

    Returns
    -------
    y : ndarray
        Same shape, dtype and array kind as ``input``.
    h : ndarray
        Only with ``prenorm``: the residual sum, the next block's residual.

    Examples
    --------
    >>> bn.rms_norm(np.array([[3.0, -4.0]]), 2).round(4)
    array([[ 0.8485, -1.1314]])
    """
    prenorm = v.check_bool(prenorm, "prenorm")
    out = forward_rows(input, normalized_shape, weight, None, eps, rms=True, residual=residual,
                       residual_in_fp32=residual_in_fp32, keep=False, want_sum=prenorm)
    return (out.y, _sum_out(out, input)) if prenorm else out.y


@accepts("grad_output", "input", "rstd", "weight", "grad_prenorm")
@parameters_from(layer_norm_backward)
def rms_norm_backward(grad_output: Any, input: Any, normalized_shape: Any, rstd: Any,
                      weight: Any = None, *, grad_prenorm: Any = None) -> tuple[Any, Any]:
    """Gradients of :func:`rms_norm_forward` with respect to input and weight.

    Parameters
    ----------
    rstd : ndarray
        What the forward pass returned.

    Returns
    -------
    grad_input : ndarray
        Same shape, dtype and array kind as ``input``.
    grad_weight : ndarray
        Of ``normalized_shape``.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((4, 8))
    >>> y, rstd = bn.rms_norm_forward(x, 8)
    >>> dx, dweight = bn.rms_norm_backward(np.ones_like(y), x, 8, rstd)
    >>> dx.shape, dweight.shape
    ((4, 8), (8,))
    """
    dx, dw, _ = _backward(grad_output, input, None, rstd, weight, False, "rms_norm_backward",
                          (_shape_key(normalized_shape),), _rows_check(input, normalized_shape),
                          rms=True, grad_sum=grad_prenorm)
    return dx, dw

"""Functional batch normalization: validation, backend resolution, array-kind bookkeeping.

Every argument is checked before anything is computed or written. The backend then does the
numerics (statistics, coefficients, apply, backward) on its own arrays; results come back in the
caller's array kind, and running statistics are written back into the caller's arrays.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, NamedTuple

from . import _validation as v
from ._docstrings import parameters_from
from ._interop import accepts
from ._layout import Layout
from ._moments import Moments
from .backends import dispatch
from .backends._common import cast, compute_dtype

_NUMPY = dispatch.module_for("numpy")
_CUPY = dispatch.module_for("cupy")
_FORWARD_ARRAYS = ("input", "running_mean", "running_var", "weight", "bias", "residual")


def _backend(kind: str, setting: str | None = None) -> ModuleType:
    """The backend for ``kind`` under the setting in force (``setting``: the configured name, when
    the caller has it) and its environment checked."""
    backend = dispatch.backend_for(kind, setting)
    if backend is _NUMPY:
        v.check_environment()
    return backend


def _resolve(kinds: dict[str, str]) -> tuple[str, ModuleType]:
    kind = v.check_same_kind(kinds)
    return kind, _backend(kind)


# (backend name, array type) pairs whose arrays the backend's asarray returns as they are
_AS_THEY_ARE: set[tuple[str, type]] = set()


def _native(backend: ModuleType, value: Any) -> Any:
    """``value`` as an array of the backend (``value`` itself when it is one, known by its type
    after the first call), or None."""
    if value is None or (backend.name, value.__class__) in _AS_THEY_ARE:
        return value
    native = backend.asarray(value)
    if native is value:
        _AS_THEY_ARE.add((backend.name, value.__class__))
    return native


def _kept(backend: ModuleType, keep: Any) -> Any:
    """A ``keep`` that is a layer's statistics buffers
    (:class:`~bncupy.backends.cupy.StatBuffers`) for ``backend``: only the CuPy backend writes
    them; the others make new statistics (True)."""
    return keep if backend is _CUPY else True


def _caller(kind: str, backend: ModuleType, value: Any) -> Any:
    return value if backend.name == kind else dispatch.module_for(kind).asarray(value)


def _write_in_place(target: Any, value: Any, kind: str, backend: ModuleType) -> None:
    target[...] = _caller(kind, backend, cast(value, target.dtype))


def _check_forward(input: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any,
                   training: Any, momentum: Any, eps: Any, axis: Any, activation: Any,
                   residual: Any) -> tuple[int, bool, float, float, bool, str, ModuleType]:
    kind = v.check_input(input)
    relu = v.check_activation(activation)
    same = residual is None or v.check_like_input(residual, "residual", input) == kind
    ax = v.check_axis(axis, input.ndim)
    channels = input.shape[ax]
    training = v.check_bool(training, "training")
    eps = v.check_eps(eps)
    momentum = v.check_momentum(momentum, allow_none=False)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (both arrays or "
                         "both None)")
    if running_mean is not None:
        same &= v.check_channel_vector(running_mean, "running_mean", channels, training) == kind
        same &= v.check_channel_vector(running_var, "running_var", channels, training) == kind
    if weight is not None:
        same &= v.check_channel_vector(weight, "weight", channels) == kind
    if bias is not None:
        same &= v.check_channel_vector(bias, "bias", channels) == kind
    if not same:  # raises, naming every argument's kind
        v.check_same_kind({arg: str(dispatch.array_kind(a)) for arg, a in (
            ("input", input), ("residual", residual), ("running_mean", running_mean),
            ("running_var", running_var), ("weight", weight), ("bias", bias)) if a is not None})
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False "
                         "(evaluation normalizes with the running statistics)")
    if training:
        v.check_count(input, ax)
    backend = _backend(kind)
    if training and running_mean is not None:
        v.check_no_overlap({"running_mean": running_mean, "running_var": running_var},
                           {"input": input, "weight": weight, "bias": bias,
                            "residual": residual})
    assert momentum is not None
    return ax, training, momentum, eps, relu, kind, backend


class _Forward(NamedTuple):
    """A forward pass's output, caller's kind, and the backend-native statistics.

    ``mean`` is the most precise mean the backend has (float64 on NumPy, the statistics buffer
    on CuPy), kept for a layer's own backward pass; ``save_mean``/``save_invstd`` are what
    :func:`batch_norm_forward` returns (None where the backend makes them on demand from
    ``mean``: ``stat_rows``).
    """

    y: Any
    mean: Any
    save_mean: Any
    save_invstd: Any
    coefficients: tuple
    kind: str
    backend: ModuleType

    def saved(self) -> tuple[Any, Any]:
        saved = (self.save_mean, self.save_invstd) if self.save_mean is not None else \
            self.backend.stat_rows(self.mean)
        return _caller(self.kind, self.backend, saved[0]), _caller(self.kind, self.backend,
                                                                   saved[1])


class _Checked(NamedTuple):
    """What the checks of a forward call signature found (kept in :data:`_FORWARD_CHECKED`)."""

    relu: bool
    kind: str
    layout: Layout
    spans: tuple  # byte spans of (running_mean, running_var, input, weight, bias, residual)
    plan: Any  # the backend's plan of the signature (None when it computes on copies)


_FORWARD_CHECKED = v.CheckedCalls()


def forward_key(input: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any,
                residual: Any, training: Any, axis: Any, activation: Any, setting: str,
                owner: tuple = ()) -> tuple | None:
    """The key of a forward call's signature in :data:`_FORWARD_CHECKED`; ``owner``: what a
    layer's own checks of the call depend on besides (its type, its number of features)."""
    return _FORWARD_CHECKED.key((input, running_mean, running_var, weight, bias, residual),
                                (training, axis, activation, *owner), setting)


def forward(input: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any,
            training: Any, momentum: Any, eps: Any, axis: Any, activation: Any = None,
            residual: Any = None, keep: Any = True, owner: tuple = (),
            checked: _Checked | None = None, setting: str | None = None) -> _Forward:
    """Validated forward pass on the resolved backend; ``keep`` False when the caller uses only
    ``y`` (the statistics may then be temporaries of the backend's workspace), or a layer's
    statistics buffers (see :func:`_kept`).

    Array and option checks are cached by call signature; ``eps`` and ``momentum``, the backend
    and (in training) the memory overlap of the running statistics are checked on every call.
    A layer passes ``owner`` (see :func:`forward_key`), and ``checked`` and ``setting`` when it
    has found its call's entry already.
    """
    if setting is None:
        setting = dispatch.configured_backend()
    if checked is None:
        key = forward_key(input, running_mean, running_var, weight, bias, residual, training,
                          axis, activation, setting, owner)
        checked = _FORWARD_CHECKED.get(key)
    if checked is None:
        if getattr(input, "ndim", None) == 1 and input.size == 0:
            return _forward_empty_vector(input, running_mean, running_var, weight, bias,
                                         training, momentum, eps, axis, activation, residual)
        ax, training, momentum, eps, relu, kind, be = _check_forward(
            input, running_mean, running_var, weight, bias, training, momentum, eps, axis,
            activation, residual)
        layout = Layout.of(input, ax)
        plan = None
        if be.name == kind:
            plan = be.plan(layout.view(input), layout.axis, (layout.view(residual),),
                           (running_mean, running_var, weight, bias))
        _FORWARD_CHECKED.put(key, _Checked(relu, kind, layout, v.byte_spans(
            (running_mean, running_var, input, weight, bias, residual)), plan))
    else:
        relu, kind, layout, spans, plan = checked
        if type(eps) is not float or not 0.0 < eps < math.inf:
            eps = v.check_eps(eps)
        if type(momentum) is not float or not 0.0 <= momentum <= 1.0:
            momentum = v.check_momentum(momentum, allow_none=False)
        be = dispatch.backend_for(kind, setting)
        if be is _NUMPY:
            v.check_environment()
        if training and running_mean is not None and not v.apart(
                (running_mean, running_var, input, weight, bias, residual), 2, spans):
            v.check_no_overlap({"running_mean": running_mean, "running_var": running_var},
                               {"input": input, "weight": weight, "bias": bias,
                                "residual": residual})
    perm = layout.perm
    x = input if perm is None else input.transpose(perm)
    z = residual if perm is None or residual is None else residual.transpose(perm)
    w, b, rm, rv = weight, bias, running_mean, running_var
    if be.name != kind:  # an explicit backend computes on copies of the arrays
        x, z, w, b, rm, rv = (_native(be, a) for a in (x, z, w, b, rm, rv))
        plan = None
    if keep.__class__ is not bool:
        keep = _kept(be, keep)
    if not training:
        y, mean, save_mean, save_invstd, coef = be.normalize_eval(x, layout.axis, rm, rv, w, b,
                                                                  eps, z, relu, keep, plan)
    elif x.size == 0:  # as torch: empty output, running statistics left alone
        nan = be.xp.full(x.shape[layout.axis], float("nan"))
        y, coef = be.normalize_with(x, layout.axis, nan, nan, w, b, z, relu)
        mean = nan
        save_mean, save_invstd = (nan.astype(compute_dtype(x.dtype)) for _ in range(2))
    else:
        y, mean, save_mean, save_invstd, coef = be.normalize_train(
            x, layout.axis, w, b, eps, rm, rv, momentum, z, relu, keep, plan)
        if rm is not None and be.name != kind:
            _write_in_place(running_mean, rm, kind, be)
            _write_in_place(running_var, rv, kind, be)
    if be.name != kind:
        y = dispatch.module_for(kind).asarray(y)
    return _Forward(y if perm is None else layout.restore(y), mean, save_mean, save_invstd,
                    coef, kind, be)


def _forward_empty_vector(input: Any, running_mean: Any, running_var: Any, weight: Any,
                          bias: Any, training: Any, momentum: Any, eps: Any, axis: Any,
                          activation: Any, residual: Any) -> _Forward:
    """torch's 1-D empty input: an empty batch of (0, C), C from the per-channel arguments."""
    vectors = (running_mean, running_var, weight, bias)
    channels = next((int(a.shape[0]) for a in vectors if getattr(a, "ndim", None) == 1), 0)
    if residual is not None and getattr(residual, "shape", None) == input.shape:
        residual = residual.reshape(0, channels)
    out = forward(input.reshape(0, channels), running_mean, running_var, weight, bias, training,
                  momentum, eps, axis, activation, residual)
    return out._replace(y=out.y.reshape(input.shape))


@accepts(*_FORWARD_ARRAYS)
def batch_norm_forward(input: Any, running_mean: Any, running_var: Any, weight: Any = None,
                       bias: Any = None, training: bool = False, momentum: float = 0.1,
                       eps: float = 1e-5, *, axis: int = 1, activation: str | None = None,
                       residual: Any = None) -> tuple[Any, Any, Any]:
    """Batch normalization that also returns the statistics saved for the backward pass.

    Parameters
    ----------
    input : ndarray, shape (N, C, ...) or (N, ..., C)
        Floating array (float16, bfloat16, float32 or float64); never modified. Any array with
        ``__dlpack__`` or ``__cuda_array_interface__`` (torch, JAX, ...) is taken without a copy;
        results then come back in its kind. An empty batch gives an empty output.
    running_mean, running_var : ndarray of shape (C,) or None
        Running statistics; updated in place when ``training`` is true (and the batch is not
        empty), used when it is false.
    weight, bias : ndarray of shape (C,), optional
        Affine parameters gamma and beta (1 and 0 when None).
    training : bool
        Normalize with the batch statistics (and update the running ones) or with the running ones.
    momentum : float in [0, 1]
        Weight of the new batch in the running-statistics update.
    eps : float > 0
        Added to the variance for numerical stability.
    axis : int, keyword-only
        Channel axis: 1 (NCHW-like, the default) or -1 (channels last).
    activation : None or "relu", keyword-only
        Fused activation applied after the affine map (and the residual).
    residual : ndarray, optional, keyword-only
        Added before the activation: ``y = act(bn(input) + residual)``; input's shape.

    Returns
    -------
    y : ndarray
        Same shape, dtype, array kind and memory layout (channels-first or channels-last
        strides) as ``input``.
    save_mean, save_invstd : ndarray, shape (C,)
        Batch mean and ``1/sqrt(var + eps)`` (training) or the running equivalents (eval);
        float32 for 16-bit and float32 input, float64 for float64.

    Raises
    ------
    TypeError
        An argument is not a float array, or the arrays are of different kinds (NumPy and
        CuPy, say); the message names them.
    ValueError
        Shapes, ``axis``, ``eps``, ``momentum`` or ``activation`` out of range, one value per
        channel in training, missing running statistics in eval, or running statistics that
        share memory with another argument; the message names the argument.
    BackendUnavailableError
        The backend in force is ``"cupy"`` and CuPy cannot run here.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4), np.float32)
    >>> running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    >>> y, save_mean, save_invstd = bn.batch_norm_forward(
    ...     x, running_mean, running_var, training=True)
    >>> y.shape, save_mean.shape, save_invstd.dtype
    ((8, 3, 4, 4), (3,), dtype('float32'))
    >>> np.allclose(running_mean, 0.1 * save_mean)  # momentum 0.1, from zeros
    True
    """
    out = forward(input, running_mean, running_var, weight, bias, training, momentum, eps, axis,
                  activation, residual)
    return (out.y, *out.saved())


@accepts(*_FORWARD_ARRAYS)
@parameters_from(batch_norm_forward)
def batch_norm(input: Any, running_mean: Any, running_var: Any, weight: Any = None,
               bias: Any = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
               *, axis: int = 1, activation: str | None = None, residual: Any = None) -> Any:
    """Batch normalization with the signature and semantics of ``torch.nn.functional.batch_norm``.

    As :func:`batch_norm_forward`, without the saved statistics.

    Returns
    -------
    ndarray
        Same shape, dtype, array kind and memory layout as ``input``.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((8, 3), np.float32)
    >>> y = bn.batch_norm(x, None, None, training=True)  # batch statistics only
    >>> np.allclose(y.mean(axis=0), 0, atol=1e-6), np.allclose(y.std(axis=0), 1)
    (True, True)
    >>> y = bn.batch_norm(x, None, None, training=True, activation="relu")
    >>> bool((y >= 0).all())
    True
    """
    return forward(input, running_mean, running_var, weight, bias, training, momentum, eps,
                   axis, activation, residual, keep=False).y


@accepts("grad_output", "input", "weight", "save_mean", "save_invstd")
def batch_norm_backward(grad_output: Any, input: Any, weight: Any, save_mean: Any,
                        save_invstd: Any, *, training: bool = True, axis: int = 1,
                        ) -> tuple[Any, Any, Any]:
    """Gradients of :func:`batch_norm_forward` with respect to input, weight and bias.

    Parameters
    ----------
    grad_output : ndarray
        Gradient of the loss with respect to the output; same shape as ``input``.
    input : ndarray
        The forward pass's input.
    weight : ndarray of shape (C,) or None
        The forward pass's gamma (1 when None).
    save_mean, save_invstd : ndarray, shape (C,)
        As returned by :func:`batch_norm_forward`.
    training : bool, keyword-only
        True when the forward pass normalized with batch statistics (the gradient then flows
        through the mean and variance), False for running statistics.
    axis : int, keyword-only
        Channel axis, as in the forward pass.

    Returns
    -------
    grad_input : ndarray
        Same shape, dtype and kind as ``input``.
    grad_weight, grad_bias : ndarray, shape (C,)
        ``sum(dy * xhat)`` and ``sum(dy)`` per channel; dtype of ``weight`` (or of the saved
        statistics when ``weight`` is None).

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((8, 3), np.float32)
    >>> weight = np.full(3, 2.0, np.float32)
    >>> y, mean, invstd = bn.batch_norm_forward(x, None, None, weight, training=True)
    >>> dy = np.ones_like(y)              # a constant gradient: nothing flows to x
    >>> dx, dweight, dbias = bn.batch_norm_backward(dy, x, weight, mean, invstd)
    >>> dbias, np.allclose(dx, 0, atol=1e-6)
    (array([8., 8., 8.], dtype=float32), True)
    """
    return backward(grad_output, input, weight, save_mean, save_invstd, training, axis)


_BACKWARD_CHECKED = v.CheckedCalls()


def backward(grad_output: Any, input: Any, weight: Any, mean: Any, invstd: Any, training: Any,
             axis: Any, saved_arg_names: tuple[str, str] = ("save_mean", "save_invstd"),
             fused: tuple | None = None, layer: bool = False,
             origin: _Checked | None = None) -> tuple[Any, ...]:
    """Validated backward pass.

    A ``layer``'s ``mean``/``invstd`` are its forward's backend-native statistics (checked when
    they were made). ``fused`` is a layer's fused ReLU forward ``(coefficients, residual)``: the
    mask is applied to ``grad_output`` inline, and a fourth result is the residual's gradient.
    ``origin``: the cached entry of the layer's forward call, whose signature fixes the
    statistics' signatures and the options: the key then holds it in their place.
    """
    setting = dispatch.configured_backend()
    residual = None if fused is None else fused[1]
    if origin is None:
        key = _BACKWARD_CHECKED.key((grad_output, input, weight, mean, invstd, residual),
                                    (training, axis, layer, saved_arg_names), setting)
    else:  # the entry (kept alive by the one cached) by identity, so its id is never reused
        key = _BACKWARD_CHECKED.key((grad_output, input, weight, residual), (id(origin),),
                                    setting)
    checked = _BACKWARD_CHECKED.get(key)
    if checked is None:
        kinds = {"input": v.check_input(input)}
        kinds["grad_output"] = v.check_like_input(grad_output, "grad_output", input)
        ax = v.check_axis(axis, input.ndim)
        if not layer:
            for arg, value in zip(saved_arg_names, (mean, invstd), strict=True):
                kinds[arg] = v.check_channel_vector(value, arg, input.shape[ax])
        if weight is not None:
            kinds["weight"] = v.check_channel_vector(weight, "weight", input.shape[ax])
        training = v.check_bool(training, "training")
        kind, be = _resolve(kinds)
        layout = Layout.of(input, ax)
        arrays = (grad_output, input, weight, mean, invstd, residual)
        # the arrays go to the backend as they are (its own kind, no subclass to strip)
        native = be.name == kind and all(a is None or _native(be, a) is a for a in arrays)
        plan = be.plan(layout.view(input), layout.axis, (
            layout.view(grad_output), layout.view(residual)), (weight, mean, invstd)) \
            if native else None
        gd = weight.dtype if weight is not None else compute_dtype(input.dtype)
        _BACKWARD_CHECKED.put(key, (kind, layout, native, plan, gd, origin))
    else:
        kind, layout, native, plan, gd, _ = checked
        be = _backend(kind, setting)
    if input.size == 0:  # no values, no parameter gradient (an empty batch's stats are NaN)
        channels = input.shape[layout.axis] if layout.perm is None else \
            input.shape[layout.perm[layout.axis]]
        mean = invstd = be.xp.zeros(channels, compute_dtype(input.dtype))
        fused, plan = None, None
    if native:
        if layout.perm is not None:
            grad_output, input = layout.view(grad_output), layout.view(input)
            if fused is not None:
                fused = (fused[0], layout.view(residual))
        dx, grad_weight, grad_bias, grad_residual = be.backward(
            grad_output, input, layout.axis, weight, mean, invstd, training, fused, plan)
    else:
        mean, invstd = _native(be, mean), _native(be, invstd)
        if fused is not None:
            fused = (fused[0], _native(be, layout.view(fused[1])))
        dx, grad_weight, grad_bias, grad_residual = be.backward(
            _native(be, layout.view(grad_output)), _native(be, layout.view(input)),
            layout.axis, _native(be, weight), mean, invstd, training, fused)
    if grad_weight.dtype != gd:
        grad_weight, grad_bias = cast(grad_weight, gd), cast(grad_bias, gd)
    if be.name != kind:
        dx, grad_weight, grad_bias = (_caller(kind, be, a) for a in (dx, grad_weight, grad_bias))
        if grad_residual is not None:
            grad_residual = _caller(kind, be, grad_residual)
    if layout.perm is not None:
        dx = layout.restore(dx)
        if grad_residual is not None:
            grad_residual = layout.restore(grad_residual)
    if grad_residual is None:
        return dx, grad_weight, grad_bias
    return dx, grad_weight, grad_bias, grad_residual


def statistics(x: Any, axis: Any, arg: str) -> Moments:
    """:func:`welford`, with the input's argument name for error messages."""
    kind = v.check_input(x, arg)
    ax = v.check_axis(axis, x.ndim)
    kind, be = _resolve({arg: kind})
    layout = Layout.of(x, ax)
    count, mean, m2 = be.stats(be.asarray(layout.view(x)), layout.axis)
    sd = compute_dtype(x.dtype)
    return Moments(count, _caller(kind, be, mean.astype(sd)), _caller(kind, be, m2.astype(sd)))


@accepts("x")
def welford(x: Any, axis: int = 1) -> Moments:
    """Mergeable per-channel statistics of ``x`` over every axis but ``axis``.

    Parameters
    ----------
    x : ndarray, shape (N, C, ...) or (N, ..., C)
        Float array (float16, bfloat16, float32 or float64), or any array with ``__dlpack__``.
    axis : int
        The channel axis, 1 or -1; statistics are taken over every other one.

    Returns
    -------
    Moments
        ``count`` (values per channel), ``mean`` and ``m2`` (sum of squared deviations), the
        arrays in the caller's kind, float32 for 16-bit and float32 input and float64 for float64.

    Examples
    --------
    >>> x = np.arange(12.0).reshape(4, 3)
    >>> m = bn.welford(x[:2]).merge(bn.welford(x[2:]))  # two batches
    >>> m.count, m.mean, m.var(ddof=1)
    (4, array([4.5, 5.5, 6.5]), array([15., 15., 15.]))
    """
    return statistics(x, axis, "x")


@accepts("x")
def moments(x: Any, axis: int = 1) -> tuple[Any, Any]:
    """Per-channel mean and biased variance of ``x`` over every axis but ``axis``.

    Parameters
    ----------
    x : ndarray, shape (N, C, ...) or (N, ..., C)
        Float array (float16, bfloat16, float32 or float64), or any array with ``__dlpack__``.
    axis : int
        The channel axis, 1 or -1; statistics are taken over every other one.

    Returns
    -------
    mean, var : ndarray, shape (C,)
        In the caller's array kind; float32 for 16-bit and float32 input, float64 for float64;
        NaN for channels with no values.

    Examples
    --------
    >>> x = np.arange(12.0).reshape(4, 3)
    >>> bn.moments(x)
    (array([4.5, 5.5, 6.5]), array([11.25, 11.25, 11.25]))
    >>> bn.moments(np.arange(24.0).reshape(2, 3, 4), axis=-1)[0]  # channels last
    array([10., 11., 12., 13.])
    """
    m = welford(x, axis)
    if m.count == 0:
        return m.mean * float("nan"), m.var()
    return m.mean, m.var()

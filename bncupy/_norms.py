"""Functional GroupNorm and InstanceNorm with torch's signatures and semantics, and what the
normalizations over groups share (LayerNorm and RMSNorm: :mod:`._row_norms`).

They are one computation over different groups (see :class:`.backends._groups.GroupLayout`):
validation and the grouping live here, the arithmetic in the backends' ``group_forward`` and
``group_backward``. Every argument is checked before anything is computed or written.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from . import _validation as v
from ._docstrings import parameters_from
from ._functional import _backend, _caller, _kept, _native
from ._functional import backward as _bn_backward
from ._functional import forward as _bn_forward
from ._interop import accepts
from .backends import dispatch
from .backends._common import cast, compute_dtype
from .backends._groups import GroupLayout


class GroupForward(NamedTuple):
    """A forward pass over groups: output (caller's kind), the per-group mean and invstd and the
    backend-native statistics a backward pass takes (the precise mean)."""

    y: Any
    mean: Any
    invstd: Any
    saved: Any
    kind: str
    backend: ModuleType
    layout: GroupLayout
    shape: tuple[int, ...]  # the layout's canonical shape of the input
    rms: bool = False  # RMSNorm
    sum: Any = None  # the residual sum normalized (backend-native), when one was formed


def group_backward(grad_output: Any, input: Any, out: GroupForward, weight: Any,
                   grad_sum: Any = None) -> tuple[Any, Any, Any]:
    """Backend-native ``dx`` (input's shape), ``dweight``, ``dbias`` of a :class:`GroupForward`
    (of ``input``, or of ``out.sum`` when the forward normalized a residual sum; ``grad_sum``:
    the gradient that sum receives from elsewhere, checked by the caller)."""
    be = out.backend
    source = input if out.sum is None else out.sum
    key = _CHECKED.key((grad_output, input), (
        "layer backward", out.kind, be.name, None if out.sum is None else out.sum.dtype), "")
    direct = _CHECKED.get(key)
    if direct is None:
        v.check_same_kind({"input": out.kind,
                           "grad_output": v.check_like_input(grad_output, "grad_output", input)})
        direct = grad_output.dtype == source.dtype and _as_they_are(be, out.kind,
                                                                    (grad_output, input))
        _CHECKED.put(key, direct)
    if not direct:
        grad_output, source = _contiguous(be, grad_output), _contiguous(be, source)
    dx, dw, db = be.group_backward(
        grad_output, source, out.layout, _flat(be, weight), out.saved, out.invstd, out.rms,
        None if grad_sum is None else _contiguous(be, grad_sum), True, direct)
    return _shaped(dx, input.shape), dw, db


def _check_array(value: Any, arg: str, kinds: dict[str, str]) -> None:
    kinds[arg] = v.check_array(value, arg)
    v.check_float(value, arg)


def _check_vector(value: Any, arg: str, shape: tuple[int, ...], kinds: dict[str, str],
                  what: str, required: bool = False) -> None:
    if value is None and not required:
        return
    _check_array(value, arg, kinds)
    if tuple(value.shape) != shape:
        raise ValueError(f"{arg} must have shape {shape} ({what}), got {tuple(value.shape)}")


def _stats_out(kind: str, be: ModuleType, value: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    return _caller(kind, be, cast(value, compute_dtype(dtype)).reshape(shape))


def _grads_out(kind: str, be: ModuleType, dx: Any, dw: Any, db: Any, shape: tuple[int, ...],
               input: Any, weight: Any) -> tuple[Any, Any, Any]:
    gd = weight.dtype if weight is not None else compute_dtype(input.dtype)
    dx, dw = _shaped(dx, input.shape), cast(_shaped(dw, shape), gd)
    db = None if db is None else cast(_shaped(db, shape), gd)  # None: RMSNorm on the GPU
    if be.name == kind:
        return dx, dw, db
    return (_caller(kind, be, dx), _caller(kind, be, dw),
            None if db is None else _caller(kind, be, db))


def _contiguous(be: ModuleType, a: Any) -> Any:
    """``a`` as a C-contiguous array of the backend, in its own shape (the backends read any
    contiguous array by its group layout, so no reshape is needed)."""
    a = _native(be, a)
    return a if a.flags.c_contiguous else be.xp.ascontiguousarray(a)


def _shaped(a: Any, shape: tuple[int, ...]) -> Any:
    return a if a.shape == shape else a.reshape(shape)


_CHECKED = v.CheckedCalls()


def _checked_key(tag: str, arrays: tuple, options: tuple) -> tuple | None:
    """The key of a call signature in :data:`_CHECKED` (see :func:`_checked`)."""
    return _CHECKED.key(arrays, (tag, *options), dispatch.configured_backend())


def _checked(tag: str, arrays: tuple, options: tuple, check: Any,
             found: tuple | None = None) -> tuple[tuple, ModuleType]:
    """What ``check()`` returns, ``(kind, ...)`` (cached by call signature), and the backend;
    ``found``: the entry, when the caller (a layer) has looked it up already."""
    if found is None:
        key = _checked_key(tag, arrays, options)
        found = _CHECKED.get(key)
        if found is None:
            found = check()
            _CHECKED.put(key, found)
    return found, _backend(found[0])


def checked_entry(tag: str, arrays: tuple, options: tuple) -> tuple | None:
    """The entry of a call signature that passed its checks (what its ``check()`` returned),
    or None: a layer looks its call up first and runs its own checks only when it is missing."""
    return _CHECKED.get(_checked_key(tag, arrays, options))


def group_norm_signature(input: Any, num_groups: Any, weight: Any, bias: Any,
                         axis: Any) -> tuple[str, tuple, tuple]:
    """The tag, arrays and options a :func:`forward_group_norm` call is cached by."""
    return "group_norm", (input, weight, bias), (num_groups, axis)


def instance_norm_signature(input: Any, running_mean: Any, running_var: Any, weight: Any,
                            bias: Any, use_input_stats: Any,
                            axis: Any) -> tuple[str, tuple, tuple]:
    """The tag, arrays and options a :func:`forward_instance_norm` call is cached by."""
    return ("instance_norm", (input, running_mean, running_var, weight, bias),
            (use_input_stats, axis))


def _run_forward(be: ModuleType, kind: str, input: Any, lay: GroupLayout,
                 shape: tuple[int, ...], weight: Any, bias: Any, eps: float,
                 running: tuple | None = None, keep: Any = True, rms: bool = False,
                 residual: Any = None, sum_dtype: Any = None,
                 direct: bool = False) -> GroupForward:
    """The backend's forward over ``lay``; ``residual``/``sum_dtype``: see the backends'
    ``group_forward`` (the sum is kept in the result when the backward pass needs it);
    ``keep``: see :func:`._functional.forward`; ``direct``: the call signature's input and
    residual are the backend's own C-contiguous arrays (see :func:`_as_they_are`)."""
    x, native = input, residual
    if not direct:
        x = _contiguous(be, input)
        native = None if residual is None else _contiguous(be, residual)
    if keep.__class__ is not bool:
        keep = _kept(be, keep)
    y, mean, invstd, saved, h = be.group_forward(
        x, lay, weight, bias, eps, running, keep, rms, native, sum_dtype, direct)
    return GroupForward(_caller(kind, be, _shaped(y, input.shape)), mean, invstd, saved, kind,
                        be, lay, shape, rms, h)


def _backward(grad_output: Any, input: Any, mean: Any, rstd: Any, weight: Any, grouped: bool,
              tag: str, options: tuple, layout: Any, rms: bool = False,
              grad_sum: Any = None) -> tuple[Any, Any, Any]:
    """The functional backward of any grouping. ``layout()`` checks the grouping and returns
    it, the canonical shape and the expected shapes of mean/rstd and of weight, with what they
    are named after in messages; every check is cached by call signature. ``rms``: RMSNorm's
    (``mean`` is None); ``grad_sum`` (rows): ``grad_prenorm``, added to the input gradient."""
    def check() -> tuple:
        kinds: dict[str, str] = {}
        if grouped:
            _check_group_input(input, kinds)
        else:
            _check_array(input, "input", kinds)
        kinds["grad_output"] = v.check_like_input(grad_output, "grad_output", input)
        if grad_sum is not None:
            kinds["grad_prenorm"] = v.check_like_input(grad_sum, "grad_prenorm", input)
        lay, canonical, stats, params = layout()
        if not rms:
            _check_vector(mean, "mean", stats[0], kinds, stats[1], required=True)
        _check_vector(rstd, "rstd", stats[0], kinds, stats[1], required=True)
        _check_vector(weight, "weight", params[0], kinds, params[1])
        kind = v.check_same_kind(kinds)
        arrays = (grad_output, input, mean, rstd, weight, grad_sum)
        return kind, lay, canonical, params[0], _as_they_are(_backend(kind), kind, arrays)

    (kind, lay, canonical, params, direct), be = _checked(
        tag, (grad_output, input, mean, rstd, weight, grad_sum), options, check)
    if direct:  # the backend reads these arrays as they are (any shape, by their group order)
        dx, dw, db = be.group_backward(grad_output, input, lay, weight, mean, rstd, rms,
                                       grad_sum)
    else:
        dx, dw, db = be.group_backward(
            _contiguous(be, grad_output), _contiguous(be, input), lay, _flat(be, weight),
            _flat(be, mean), _flat(be, rstd), rms,
            None if grad_sum is None else _contiguous(be, grad_sum))
    return _grads_out(kind, be, dx, dw, db, params, input, weight)


def _as_they_are(be: ModuleType, kind: str, arrays: tuple) -> bool:
    """Whether the backend takes ``arrays`` (of a checked call signature) as they are: its own
    kind, C-contiguous."""
    return be.name == kind and all(a is None or (_native(be, a) is a and a.flags.c_contiguous)
                                   for a in arrays)


def _flat(be: ModuleType, value: Any) -> Any:
    if value is None:
        return None
    value = _native(be, value)
    return value if value.ndim == 1 else value.reshape(-1)


# ------------------------------------------------------------------------------ GroupNorm

def check_num_groups(num_groups: Any, channels: int | None = None) -> int:
    """A group count >= 1 that divides ``channels`` (when given)."""
    num_groups = v.check_int(num_groups, "num_groups", minimum=1)
    if channels is not None and channels % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the number of channels "
                         f"({channels})")
    return int(num_groups)


def _group_layout(input: Any, axis: Any, channels_per_group: int | None,
                  num_groups: int | None = None) -> tuple[GroupLayout, tuple[int, ...]]:
    """The layout of an (N, C, ...) or, with axis=-1, (N, ..., C) input; the canonical shape."""
    ax = v.check_axis(axis, input.ndim)
    if ax not in (1, input.ndim - 1):
        raise ValueError(f"axis must be 1 (N, C, ...) or -1 (N, ..., C), got {axis}")
    n, c = int(input.shape[0]), int(input.shape[ax])
    s = int(np.prod(input.shape[1:], dtype=np.int64)) // c if c else 0
    k = channels_per_group if channels_per_group else c // check_num_groups(num_groups, c)
    if ax == 1:
        return GroupLayout("cf", n, c, s, max(k, 1)), (n, c, s)
    return GroupLayout("cl", n, c, s, max(k, 1)), (n, s, c)


def _check_group_input(input: Any, kinds: dict[str, str]) -> None:
    kinds["input"] = v.check_input(input)


@accepts("input", "weight", "bias")
def group_norm_forward(input: Any, num_groups: int, weight: Any = None, bias: Any = None,
                       eps: float = 1e-5, *, axis: int = 1) -> tuple[Any, Any, Any]:
    """Group normalization that also returns the statistics its backward pass needs.

    Parameters
    ----------
    input : ndarray, shape (N, C, ...) or, with ``axis=-1``, (N, ..., C)
        A float16, bfloat16, float32 or float64 array; never modified.
    num_groups : int
        Groups of ``C / num_groups`` consecutive channels, normalized per sample; must divide C.
    weight, bias : ndarray of shape (C,), optional
        Per-channel affine parameters (1 and 0 when None).
    eps : float > 0
        Added to the variance.
    axis : 1 or -1, keyword-only
        The channel axis.

    Returns
    -------
    y : ndarray
        Same shape, dtype and array kind as ``input``.
    mean, rstd : ndarray, shape (N, num_groups)
        As torch's ``native_group_norm``.

    Raises
    ------
    TypeError
        An argument is not a float array, or the arrays are of different kinds.
    ValueError
        ``num_groups`` does not divide the channel count, ``axis`` is neither 1 nor -1, or a
        parameter's shape or ``eps`` is wrong.

    Examples
    --------
    >>> images = np.random.default_rng(1).standard_normal((4, 32, 8, 8), np.float32)
    >>> y, mean, rstd = bn.group_norm_forward(images, 8)
    >>> y.shape, mean.shape
    ((4, 32, 8, 8), (4, 8))
    """
    out = forward_group_norm(input, num_groups, weight, bias, eps, axis)
    groups = (out.layout.n, out.layout.c // out.layout.k)
    return (out.y, _stats_out(out.kind, out.backend, out.mean, groups, input.dtype),
            _stats_out(out.kind, out.backend, out.invstd, groups, input.dtype))


def forward_group_norm(input: Any, num_groups: Any, weight: Any, bias: Any, eps: Any,
                       axis: Any, keep: Any = True, found: tuple | None = None) -> GroupForward:
    """Validated group normalization on the resolved backend; ``found``: the call's
    :func:`checked_entry`, when the caller has it."""
    def check() -> tuple:
        kinds: dict[str, str] = {}
        _check_group_input(input, kinds)
        lay, canonical = _group_layout(input, axis, None, num_groups)
        _check_vector(weight, "weight", (lay.c,), kinds, "one per channel")
        _check_vector(bias, "bias", (lay.c,), kinds, "one per channel")
        v.check_eps(eps)
        kind = v.check_same_kind(kinds)
        return kind, lay, canonical, _as_they_are(_backend(kind), kind, (input, weight, bias))

    (kind, lay, canonical, direct), be = _checked(
        *group_norm_signature(input, num_groups, weight, bias, axis), check, found)
    if type(eps) is not float or not 0.0 < eps < math.inf:
        eps = v.check_eps(eps)
    if not direct:
        weight, bias = _native(be, weight), _native(be, bias)
    return _run_forward(be, kind, input, lay, canonical, weight, bias, eps, keep=keep,
                        direct=direct)


@accepts("input", "weight", "bias")
@parameters_from(group_norm_forward)
def group_norm(input: Any, num_groups: int, weight: Any = None, bias: Any = None,
               eps: float = 1e-5, *, axis: int = 1) -> Any:
    """Group normalization with the signature and semantics of
    ``torch.nn.functional.group_norm``.

    As :func:`group_norm_forward`, without the statistics.

    Returns
    -------
    ndarray
        Same shape, dtype and array kind as ``input``.

    Examples
    --------
    >>> images = np.random.default_rng(1).standard_normal((4, 32, 8, 8), np.float32)
    >>> bn.group_norm(images, 8).shape
    (4, 32, 8, 8)
    >>> nhwc = images.transpose(0, 2, 3, 1)           # channels last
    >>> bn.group_norm(nhwc, 8, axis=-1).shape
    (4, 8, 8, 32)
    """
    return forward_group_norm(input, num_groups, weight, bias, eps, axis, keep=False).y


@accepts("grad_output", "input", "mean", "rstd", "weight")
@parameters_from(group_norm_forward)
def group_norm_backward(grad_output: Any, input: Any, num_groups: int, mean: Any, rstd: Any,
                        weight: Any = None, *, axis: int = 1) -> tuple[Any, Any, Any]:
    """Gradients of :func:`group_norm_forward` with respect to input, weight and bias.

    Parameters
    ----------
    grad_output : ndarray
        Gradient of the loss with respect to the output; same shape as ``input``.
    input : ndarray
        The forward pass's input.
    mean, rstd : ndarray, shape (N, num_groups)
        What the forward pass returned.
    weight : ndarray, optional
        The forward pass's weight (1 when None).

    Returns
    -------
    grad_input : ndarray
        Same shape, dtype and array kind as ``input``.
    grad_weight, grad_bias : ndarray, shape (C,)
        Per-channel parameter gradients.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((2, 4, 3))
    >>> y, mean, rstd = bn.group_norm_forward(x, 2)
    >>> dy = np.ones_like(y)
    >>> dx, dweight, dbias = bn.group_norm_backward(dy, x, 2, mean, rstd)
    >>> dx.shape, dbias
    ((2, 4, 3), array([6., 6., 6., 6.]))
    """
    def layout() -> tuple:
        lay, canonical = _group_layout(input, axis, None, num_groups)
        return (lay, canonical, ((lay.n, lay.c // lay.k), "(N, num_groups)"),
                ((lay.c,), "one per channel"))

    return _backward(grad_output, input, mean, rstd, weight, True, "group_norm_backward",
                     (num_groups, axis), layout)


# ------------------------------------------------------------------------------ InstanceNorm

def check_spatial(input: Any, axis: Any) -> None:
    """torch's error for instance statistics of a single value."""
    _check_spatial(input, _group_layout(input, axis, 1)[0])


def _check_spatial(input: Any, lay: GroupLayout) -> None:
    if lay.s <= 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size "
                         f"{tuple(input.shape)}")


@accepts("input", "running_mean", "running_var", "weight", "bias")
def instance_norm_forward(input: Any, running_mean: Any = None, running_var: Any = None,
                          weight: Any = None, bias: Any = None, use_input_stats: bool = True,
                          momentum: float = 0.1, eps: float = 1e-5, *, axis: int = 1,
                          ) -> tuple[Any, Any, Any]:
    """Instance normalization that also returns the statistics its backward pass needs.

    With ``use_input_stats`` each (sample, channel) is normalized with its own statistics and the
    running statistics (when given) move towards their average over the batch, the variance
    unbiased, as torch does; otherwise the running statistics normalize.

    Parameters
    ----------
    input : ndarray, shape (N, C, ...) or, with ``axis=-1``, (N, ..., C)
        A float16, bfloat16, float32 or float64 array; never modified.
    running_mean, running_var : ndarray of shape (C,), optional
        Running statistics: updated in place with ``use_input_stats``, used without it.
    weight, bias : ndarray of shape (C,), optional
        Per-channel affine parameters (1 and 0 when None).
    use_input_stats : bool
        Normalize each instance with its own statistics (True) or with the running ones.
    momentum : float in [0, 1]
        Weight of the batch's average in the running-statistics update.
    eps : float > 0
        Added to the variance.
    axis : 1 or -1, keyword-only
        The channel axis.

    Returns
    -------
    y : ndarray
        Same shape, dtype and array kind as ``input``.
    mean, rstd : ndarray
        Shape (N, C) with input statistics, (C,) with running ones.

    Raises
    ------
    TypeError
        An argument is not a float array, or the arrays are of different kinds.
    ValueError
        One value per instance with ``use_input_stats`` ("Expected more than 1 spatial
        element", as torch), no running statistics without it, or a wrong shape, ``axis``,
        ``eps`` or ``momentum``.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 5)) + 4
    >>> running_mean, running_var = np.zeros(3), np.ones(3)
    >>> y, mean, rstd = bn.instance_norm_forward(x, running_mean, running_var)
    >>> mean.shape, bool(np.allclose(running_mean, 0.1 * mean.mean(axis=0)))
    ((2, 3), True)
    """
    out = forward_instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                                momentum, eps, axis)
    if isinstance(out, GroupForward):
        cells = (out.layout.n, out.layout.c)
        return (out.y, _stats_out(out.kind, out.backend, out.mean, cells, input.dtype),
                _stats_out(out.kind, out.backend, out.invstd, cells, input.dtype))
    return (out.y, *out.saved())


def forward_instance_norm(input: Any, running_mean: Any, running_var: Any, weight: Any,
                          bias: Any, use_input_stats: Any, momentum: Any, eps: Any, axis: Any,
                          keep: Any = True, found: tuple | None = None) -> Any:
    """Validated instance normalization: a :class:`GroupForward` with input statistics (running
    statistics updated in place when given), else batch normalization's eval forward;
    ``found``: the call's :func:`checked_entry`, when the caller has it."""
    def check() -> tuple:
        kinds: dict[str, str] = {}
        _check_group_input(input, kinds)
        lay, canonical = _group_layout(input, axis, 1)
        if not v.check_bool(use_input_stats, "use_input_stats"):
            if running_mean is None or running_var is None:
                raise ValueError("running_mean and running_var are required when "
                                 "use_input_stats=False")
            return kinds["input"], lay, canonical, False
        v.check_eps(eps)
        v.check_momentum(momentum, allow_none=False)
        if (running_mean is None) != (running_var is None):
            raise ValueError("running_mean and running_var must be given together (both arrays "
                             "or both None)")
        for arg, value in (("running_mean", running_mean), ("running_var", running_var),
                           ("weight", weight), ("bias", bias)):
            if value is not None:
                kinds[arg] = v.check_channel_vector(value, arg, lay.c, arg.startswith("running"))
        _check_spatial(input, lay)
        kind = v.check_same_kind(kinds)
        return kind, lay, canonical, _as_they_are(_backend(kind), kind, (
            input, running_mean, running_var, weight, bias))

    (kind, lay, canonical, direct), be = _checked(*instance_norm_signature(
        input, running_mean, running_var, weight, bias, use_input_stats, axis), check, found)
    if not use_input_stats:
        return _bn_forward(input, running_mean, running_var, weight, bias, False, momentum, eps,
                           1 if lay.kind == "cf" else -1, keep=keep)
    if type(eps) is not float or not 0.0 < eps < math.inf:
        eps = v.check_eps(eps)
    if type(momentum) is not float or not 0.0 <= momentum <= 1.0:
        momentum = v.check_momentum(momentum, allow_none=False)
    if running_mean is not None:
        v.check_no_overlap({"running_mean": running_mean, "running_var": running_var},
                           {"input": input, "weight": weight, "bias": bias})
    running = None
    if not direct:
        weight, bias = _native(be, weight), _native(be, bias)
    if running_mean is not None:
        running = ((running_mean, running_var, momentum) if direct else
                   (_native(be, running_mean), _native(be, running_var), momentum))
    out = _run_forward(be, kind, input, lay, canonical, weight, bias, eps, running, keep,
                       direct=direct)
    if running is not None and be.name != kind:  # computed on copies: write them back
        for target, value in zip((running_mean, running_var), running[:2], strict=False):
            target[...] = _caller(kind, be, value)
    return out


@accepts("input", "running_mean", "running_var", "weight", "bias")
@parameters_from(instance_norm_forward)
def instance_norm(input: Any, running_mean: Any = None, running_var: Any = None,
                  weight: Any = None, bias: Any = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5, *, axis: int = 1) -> Any:
    """Instance normalization with the signature and semantics of
    ``torch.nn.functional.instance_norm``.

    As :func:`instance_norm_forward`, without the statistics.

    Returns
    -------
    ndarray
        Same shape, dtype and array kind as ``input``.

    Examples
    --------
    >>> images = np.random.default_rng(1).standard_normal((4, 32, 8, 8), np.float32)
    >>> y = bn.instance_norm(images)                  # per (sample, channel)
    >>> bool(np.allclose(y.mean(axis=(2, 3)), 0, atol=1e-5))
    True
    """
    return forward_instance_norm(input, running_mean, running_var, weight, bias,
                                 use_input_stats, momentum, eps, axis, keep=False).y


@accepts("grad_output", "input", "mean", "rstd", "weight")
@parameters_from(group_norm_backward, instance_norm_forward)
def instance_norm_backward(grad_output: Any, input: Any, mean: Any, rstd: Any,
                           weight: Any = None, *, use_input_stats: bool = True,
                           axis: int = 1) -> tuple[Any, Any, Any]:
    """Gradients of :func:`instance_norm_forward` with respect to input, weight and bias.

    Through the per-instance statistics, or (with ``use_input_stats=False``) with the running
    statistics as constants.

    Parameters
    ----------
    mean, rstd : ndarray
        What the forward pass returned: (N, C) with input statistics, (C,) with running ones.
    use_input_stats : bool, keyword-only
        As in the forward pass.

    Returns
    -------
    grad_input : ndarray
        Same shape, dtype and array kind as ``input``.
    grad_weight, grad_bias : ndarray, shape (C,)
        Per-channel parameter gradients.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 5))
    >>> y, mean, rstd = bn.instance_norm_forward(x)
    >>> dy = np.ones_like(y)
    >>> dx, dweight, dbias = bn.instance_norm_backward(dy, x, mean, rstd)
    >>> dx.shape, dbias
    ((2, 3, 5), array([10., 10., 10.]))
    """
    use_input_stats = v.check_bool(use_input_stats, "use_input_stats")
    if not use_input_stats:
        return _bn_backward(grad_output, input, weight, mean, rstd, False,
                            1 if v.check_axis(axis, getattr(input, "ndim", 2)) == 1 else -1,
                            ("mean", "rstd"))
    def layout() -> tuple:
        lay, canonical = _group_layout(input, axis, 1)
        return lay, canonical, ((lay.n, lay.c), "(N, C)"), ((lay.c,), "one per channel")

    return _backward(grad_output, input, mean, rstd, weight, True, "instance_norm_backward",
                     (axis,), layout)

"""Cross-process batch normalization: public building blocks and :class:`SyncBatchNorm`.

The building blocks mirror PyTorch's ``batch_norm_stats``, ``batch_norm_gather_stats_with_counts``,
``batch_norm_elemt``, ``batch_norm_backward_reduce`` and ``batch_norm_backward_elemt``, so that
any communication layer can drive them; :class:`SyncBatchNorm` drives them over mpi4py or NCCL
with one all-gather forward and one backward per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from . import _validation as v
from ._comm import wrap
from ._docstrings import parameters_from
from ._functional import _caller, _native, _resolve, statistics
from ._layers import _BatchNorm
from ._moments import Moments
from .backends import dispatch
from .backends._common import backward_coefficients, cast, merge, quiet


def batch_norm_stats(input: Any, *, axis: int = 1) -> Moments:
    """This process's per-channel Welford partials (count, mean, m2), as :func:`welford`.

    Parameters
    ----------
    input : ndarray, shape (N, C, ...) or (N, ..., C)
        This process's slice of the global batch (it may be empty).
    axis : int, keyword-only
        The channel axis.

    Returns
    -------
    Moments
        What to send to the other processes.

    Examples
    --------
    >>> x = np.arange(12.0).reshape(4, 3)
    >>> bn.batch_norm_stats(x).count
    4
    """
    return statistics(input, axis, "input")


def _merge_partials(partials: Sequence[Moments]) -> tuple[int, Any, Any]:
    total: tuple[int, Any, Any] = (0, None, None)
    for part in partials:  # rank order: every process gets bitwise the same result
        mean, m2 = part.mean.astype(np.float64), part.m2.astype(np.float64)
        total = (part.count, mean, m2) if total[1] is None else merge(total, (part.count, mean, m2))
    return total


@quiet
def batch_norm_gather_stats(partials: Sequence[Moments], running_mean: Any = None,
                            running_var: Any = None, momentum: float = 0.1, eps: float = 1e-5,
                            ) -> tuple[Any, Any]:
    """Merge every process's partials (in the given order) into the global mean and invstd.

    Parameters
    ----------
    partials : sequence of Moments
        Every process's :func:`batch_norm_stats`, in rank order (so that every process gets
        bitwise the same result).
    running_mean, running_var : ndarray of shape (C,), optional
        Updated in place when given, with the unbiased global variance.
    momentum : float in [0, 1]
        Weight of the global batch in the running-statistics update.
    eps : float > 0
        Added to the variance.

    Returns
    -------
    mean, invstd : ndarray, shape (C,), float64
        The global batch's mean and ``1/sqrt(var + eps)``.

    Raises
    ------
    TypeError
        ``partials`` is not a non-empty sequence of :class:`Moments` of one array kind.
    ValueError
        Channel counts differ, or there is one value per channel in all.

    Examples
    --------
    >>> x = np.arange(12.0).reshape(4, 3)
    >>> partials = [bn.batch_norm_stats(x[:1]), bn.batch_norm_stats(x[1:])]
    >>> mean, invstd = bn.batch_norm_gather_stats(partials)  # as from two ranks
    >>> mean
    array([4.5, 5.5, 6.5])
    """
    if isinstance(partials, Moments) or not isinstance(partials, Sequence) or not partials:
        raise TypeError("partials must be a non-empty sequence of Moments (one per process)")
    for i, part in enumerate(partials):
        if not isinstance(part, Moments):
            raise TypeError(f"partials[{i}] must be a Moments, got {type(part).__name__}")
        if part.num_channels != partials[0].num_channels:
            raise ValueError(f"partials[{i}] has {part.num_channels} channels, partials[0] has "
                             f"{partials[0].num_channels}")
    channels = partials[0].num_channels
    total = sum(part.count for part in partials)
    if total > v.MAX_COUNT:
        raise ValueError(f"partials: the counts add up to {total}, beyond {v.MAX_COUNT}")
    kinds = {f"partials[{i}]": v.check_array(p.mean, f"partials[{i}].mean")
             for i, p in enumerate(partials)}
    eps = v.check_eps(eps)
    factor = v.check_momentum(momentum, allow_none=False)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    for arg, value in (("running_mean", running_mean), ("running_var", running_var)):
        if value is not None:
            kinds[arg] = v.check_channel_vector(value, arg, channels, writable=True)
    kind = v.check_same_kind(kinds)
    v.check_no_overlap({"running_mean": running_mean, "running_var": running_var},
                       {f"partials[{i}].{field}": getattr(p, field)
                        for i, p in enumerate(partials) for field in ("mean", "m2")})
    count, mean, m2 = _merge_partials(partials)
    if count < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got {count} "
                         f"across {len(partials)} processes")
    xp = dispatch.module_for(kind).xp
    var = m2 / count
    if running_mean is not None:
        assert factor is not None
        running_mean[...] = ((1 - factor) * running_mean.astype(np.float64)
                             + factor * mean).astype(running_mean.dtype)
        running_var[...] = ((1 - factor) * running_var.astype(np.float64)
                            + factor * var * (count / (count - 1))).astype(running_var.dtype)
    return mean, 1.0 / xp.sqrt(var + eps)


def _check_elemt(input: Any, mean: Any, invstd: Any, weight: Any, axis: Any,
                 extra: dict[str, Any]) -> tuple[int, str, ModuleType]:
    kinds = {"input": v.check_input(input)}
    ax = v.check_axis(axis, input.ndim)
    channels = input.shape[ax]
    for arg, value in (("mean", mean), ("invstd", invstd), *extra.items()):
        kinds[arg] = v.check_channel_vector(value, arg, channels)
    if weight is not None:
        kinds["weight"] = v.check_channel_vector(weight, "weight", channels)
    kind, be = _resolve(kinds)
    return ax, kind, be


def batch_norm_elemt(input: Any, weight: Any, bias: Any, mean: Any, invstd: Any, *,
                     axis: int = 1, activation: str | None = None, residual: Any = None) -> Any:
    """Normalize with given (e.g. globally gathered) statistics: ``act(xhat*w + b + residual)``.

    Parameters
    ----------
    input : ndarray, shape (N, C, ...) or (N, ..., C)
        This process's slice.
    weight, bias : ndarray of shape (C,) or None
        Affine parameters (1 and 0 when None).
    mean, invstd : ndarray, shape (C,)
        As :func:`batch_norm_gather_stats` returns them.
    axis : int, keyword-only
        The channel axis.
    activation : None or "relu", keyword-only
        Fused activation.
    residual : ndarray, optional, keyword-only
        Added before the activation; ``input``'s shape.

    Returns
    -------
    ndarray
        Same shape, dtype and array kind as ``input``.

    Examples
    --------
    >>> x = np.arange(12.0).reshape(4, 3)
    >>> mean, invstd = bn.batch_norm_gather_stats([bn.batch_norm_stats(x)])
    >>> bn.batch_norm_elemt(x, None, None, mean, invstd)[:, 0].round(4)
    array([-1.3416, -0.4472,  0.4472,  1.3416])
    """
    relu = v.check_activation(activation)
    extra = {} if bias is None else {"bias": bias}
    ax, kind, be = _check_elemt(input, mean, invstd, weight, axis, extra)
    if residual is not None:
        v.check_same_kind({"input": kind, "residual": v.check_like_input(residual, "residual",
                                                                          input)})
    y, _ = be.normalize_with(be.asarray(input), ax, _native(be, mean), _native(be, invstd),
                             _native(be, weight), _native(be, bias), _native(be, residual), relu)
    return _caller(kind, be, y)


def batch_norm_backward_reduce(grad_output: Any, input: Any, mean: Any, invstd: Any, *,
                               axis: int = 1) -> tuple[Any, Any]:
    """This process's per-channel float64 ``sum(dy)`` and ``sum(dy * (x - mean))``.

    Parameters
    ----------
    grad_output : ndarray
        Gradient of the loss with respect to this process's output.
    input : ndarray
        This process's slice of the forward pass's input.
    mean, invstd : ndarray, shape (C,)
        The global statistics of the forward pass.
    axis : int, keyword-only
        The channel axis.

    Returns
    -------
    sum_dy, sum_dy_xmu : ndarray, shape (C,), float64
        To be summed over the processes (in rank order) for :func:`batch_norm_backward_elemt`.

    Examples
    --------
    >>> x = np.arange(12.0).reshape(4, 3)
    >>> mean, invstd = bn.batch_norm_gather_stats([bn.batch_norm_stats(x)])
    >>> dy = np.ones_like(x)
    >>> sum_dy, sum_dy_xmu = bn.batch_norm_backward_reduce(dy, x, mean, invstd)
    >>> sum_dy
    array([4., 4., 4.])
    """
    ax, kind, be = _check_elemt(input, mean, invstd, None, axis, {})
    v.check_same_kind({"input": kind, "grad_output": v.check_like_input(
        grad_output, "grad_output", input)})
    sums = be.backward_sums(be.asarray(grad_output), be.asarray(input), ax, _native(be, mean),
                            _native(be, invstd))
    return _caller(kind, be, sums[0]), _caller(kind, be, sums[1])


def batch_norm_backward_elemt(grad_output: Any, input: Any, mean: Any, invstd: Any, weight: Any,
                              sum_dy: Any, sum_dy_xmu: Any, count: int, *, axis: int = 1) -> Any:
    """Input gradient from the global sums of :func:`batch_norm_backward_reduce`.

    Parameters
    ----------
    grad_output : ndarray
        Gradient of the loss with respect to this process's output.
    input : ndarray
        This process's slice of the forward pass's input.
    mean, invstd : ndarray, shape (C,)
        The global statistics of the forward pass.
    weight : ndarray of shape (C,) or None
        The forward pass's gamma (1 when None).
    sum_dy, sum_dy_xmu : ndarray, shape (C,)
        :func:`batch_norm_backward_reduce`'s sums, added up over every process.
    count : int
        Values per channel over all processes.
    axis : int, keyword-only
        The channel axis.

    Returns
    -------
    ndarray
        Gradient with respect to ``input``.

    Raises
    ------
    ValueError
        ``count`` is below this process's own number of values per channel.

    Examples
    --------
    >>> x = np.arange(12.0).reshape(4, 3)
    >>> mean, invstd = bn.batch_norm_gather_stats([bn.batch_norm_stats(x)])
    >>> sums = bn.batch_norm_backward_reduce(np.ones_like(x), x, mean, invstd)
    >>> dy = np.ones_like(x)
    >>> dx = bn.batch_norm_backward_elemt(dy, x, mean, invstd, None, *sums, 4)
    >>> np.allclose(dx, 0)
    True
    """
    extra = {"sum_dy": sum_dy, "sum_dy_xmu": sum_dy_xmu}
    ax, kind, be = _check_elemt(input, mean, invstd, weight, axis, extra)
    v.check_same_kind({"input": kind, "grad_output": v.check_like_input(
        grad_output, "grad_output", input)})
    local = input.size // input.shape[ax] if input.shape[ax] else 0
    count = v.check_int(count, "count")
    if count < local:
        raise ValueError(f"count is the global number of values per channel and cannot be "
                         f"below this process's {local}, got {count}")
    center, a, b, c, _, _ = backward_coefficients(
        _native(be, mean), _native(be, invstd), _native(be, weight), _native(be, sum_dy),
        _native(be, sum_dy_xmu), count, True, input.dtype)
    dx = be.backward_apply(be.asarray(grad_output), be.asarray(input), ax, center, a, b, c)
    return _caller(kind, be, dx)


@parameters_from(_BatchNorm)
class SyncBatchNorm(_BatchNorm):
    """Batch normalization whose training statistics span every process of ``comm``.

    Each rank passes its local slice of the global batch (any size, empty included); outputs,
    running statistics and ``grad_weight``/``grad_bias`` equal those of a plain batch norm over
    the concatenated global batch, bitwise identical on every rank. Communication per training
    call: one all-gather of ``2 + 2C`` values forward and one of ``1 + 2C`` values backward.

    Any input with ndim >= 2 is accepted.

    Parameters
    ----------
    comm : mpi4py communicator, cupyx.distributed NCCL communicator, or None, keyword-only
        None (or a world of one) is plain single-process batch norm. MPI carries NumPy arrays,
        and CuPy arrays staged through host memory; NCCL carries CuPy arrays.

    Examples
    --------
    Without a communicator (or in a world of one) it is a plain batch norm; under ``mpiexec``,
    pass ``comm=mpi4py.MPI.COMM_WORLD``:

    >>> layer = bn.SyncBatchNorm(4, comm=None)
    >>> x = np.random.default_rng(0).standard_normal((8, 4, 2), np.float32)
    >>> dx = layer.backward(np.ones_like(layer(x)))
    >>> dx.shape
    (8, 4, 2)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, dtype: Any = np.float32,
                 *, comm: Any = None, channels_last: bool = False,
                 activation: str | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype,
                         channels_last=channels_last, activation=activation)
        self.comm = comm
        self._comm = wrap(comm)
        self._sync_saved: dict[str, Any] | None = None

    def _synchronised(self) -> bool:
        return self.training and self._comm is not None and self._comm.size > 1

    def _exchange(self, error: BaseException | None, vectors: list[Any], xp: Any) -> Any:
        """The one collective of a pass; raises on every rank if any rank's input was bad."""
        assert self._comm is not None
        local = xp.concatenate([xp.asarray([float(error is not None)])]
                               + [xp.asarray(a, dtype=np.float64).ravel() for a in vectors])
        rows = self._comm.exchange(local)
        bad = [r for r, flag in enumerate(dispatch.module_for("numpy").asarray(rows[:, 0]))
               if flag]
        if error is not None:
            raise error
        if bad:
            raise ValueError(f"SyncBatchNorm: rank(s) {bad} rejected their input (see their "
                             f"errors); no state was changed")
        return rows[:, 1:]

    def __call__(self, x: Any, residual: Any = None) -> Any:
        if self._comm is None or not self._synchronised():
            y = super().__call__(x, residual)
            self._sync_saved = None  # only now: a rejected call keeps the last forward's state
            return y
        c = self.num_features
        error: BaseException | None = None
        kind = dispatch.array_kind(x) or "numpy"
        count, mean, m2 = 0, np.zeros(c), np.zeros(c)
        try:
            kind = self._check_input(x, residual)
            if self.track_running_stats:
                self._check_counter()
            if self._comm.kind == "nccl" and kind != "cupy":
                raise TypeError("a NCCL communicator needs CuPy arrays, got a numpy.ndarray input")
            if self.track_running_stats and self._state_kind() == kind:
                v.check_no_overlap({"running_mean": self.running_mean,
                                    "running_var": self.running_var},
                                   {"input": x, "residual": residual})
            part = statistics(x, self.axis, "input")
            count, mean, m2 = part.count, part.mean, part.m2
        except (TypeError, ValueError) as exc:
            error = exc
        xp = dispatch.module_for(kind if error is None else "numpy").xp
        if self._comm.kind == "nccl":
            xp = dispatch.module_for("cupy").xp
        rows = self._exchange(error, [xp.asarray([count]), mean, m2], xp)
        partials = [Moments(int(round(float(r[0]))), r[1:1 + c], r[1 + c:]) for r in rows]
        total = sum(p.count for p in partials)
        if total < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"{total} values across {len(partials)} processes")
        if self._state_kind() != kind:
            self.to(kind)
        update = self.track_running_stats
        momentum = (1.0 / (self._batches() + 1) if self.momentum is None else self.momentum)
        to_kind = dispatch.module_for(kind).asarray
        partials = [Moments(p.count, to_kind(p.mean), to_kind(p.m2)) for p in partials]
        mean_g, invstd = batch_norm_gather_stats(
            partials, self.running_mean if update else None,
            self.running_var if update else None, momentum, self.eps)
        be = dispatch.backend_for(kind)
        mean_g, invstd = be.asarray(mean_g), be.asarray(invstd)
        y, coef = be.normalize_with(be.asarray(x), self.axis % x.ndim, mean_g, invstd,
                                    _native(be, self.weight), _native(be, self.bias),
                                    _native(be, residual), self.activation == "relu")
        if update:
            self.num_batches_tracked = np.asarray(self._batches() + 1, np.int64)
        self._sync_saved = {"x": x, "residual": residual, "mean": mean_g, "invstd": invstd,
                            "coef": coef, "count": total, "kind": kind, "backend": be}
        self._saved = None
        return _caller(kind, be, y)

    def backward(self, grad_output: Any) -> Any:
        if self._sync_saved is None:
            return super().backward(grad_output)
        s = self._sync_saved
        be, kind, x = s["backend"], s["kind"], s["x"]
        ax = self.axis % x.ndim
        error: BaseException | None = None
        c = self.num_features
        sums: tuple[Any, Any] = (np.zeros(c), np.zeros(c))
        g = grad_output
        try:
            v.check_same_kind({"input": kind, "grad_output": v.check_like_input(
                grad_output, "grad_output", x)})
            if self.activation == "relu":
                g = be.asarray(be.relu_grad(be.asarray(grad_output), be.asarray(x), ax,
                                            s["coef"], _native(be, s["residual"])))
            sums = be.backward_sums(be.asarray(g), be.asarray(x), ax, s["mean"], s["invstd"])
        except (TypeError, ValueError) as exc:
            error = exc
        xp = be.xp if error is None else np
        if self._comm is not None and self._comm.kind == "nccl":
            xp = dispatch.module_for("cupy").xp
        rows = self._exchange(error, list(sums), xp)
        rows = be.asarray(rows)
        sum_dy, sum_dy_xmu = rows[0, :c].copy(), rows[0, c:].copy()
        for r in range(1, rows.shape[0]):  # rank order
            sum_dy += rows[r, :c]
            sum_dy_xmu += rows[r, c:]
        center, a, b, k, grad_weight, grad_bias = backward_coefficients(
            s["mean"], s["invstd"], _native(be, self.weight), sum_dy, sum_dy_xmu, s["count"],
            True, x.dtype)
        dx = be.backward_apply(be.asarray(g), be.asarray(x), ax, center, a, b, k)
        if self.weight is not None and self.bias is not None:
            self.grad_weight = _caller(kind, be, cast(grad_weight, self.weight.dtype))
            self.grad_bias = _caller(kind, be, cast(grad_bias, self.bias.dtype))
        g_caller = _caller(kind, be, g) if self.activation == "relu" else grad_output
        self.grad_residual = None if s["residual"] is None else g_caller
        return _caller(kind, be, dx)


# A call and its backward document as BatchNorm*d's, whose results they equal.
SyncBatchNorm.__call__.__doc__ = _BatchNorm.__call__.__doc__
SyncBatchNorm.backward.__doc__ = _BatchNorm.backward.__doc__

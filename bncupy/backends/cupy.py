"""CuPy backend: the CUDA kernels' launch plan.

Each op allocates its outputs, takes its scratch memory from the per-stream workspace
(:mod:`._cuda`), and launches its kernels on the current stream: no CuPy elementwise ops, no
memsets and no host synchronisation on the hot path. Geometry (vector width, index type, grids,
scratch layout) is computed once per (shape, dtype, layout, alignment, SM count) and cached.
Every allocation happens before the first launch, and the caller's state (running statistics)
changes only in an op's last launch, so an op that fails part-way changes nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .._dtypes import ACC
from . import _cuda
from ._common import forward_coefficients
from ._cuda import (  # noqa: F401 - the backend's public runtime API
    NULL,
    SOURCES,
    CupyRuntime,
    _probe,
    compile_options,
    name_expressions,
    program_source,
    runtime,
    set_runtime,
    vector_width,
)
from ._groups import GroupLayout

name = "cupy"

_ACC = ACC
_INDEX64_FROM = 2**31  # elements from which kernels index with 64 bits
_THREADS = 256
_ROWS_MAX_VECS = 8192  # longer channel-first groups are split over several blocks
# Dynamic shared memory of row_norm_backward_shared (every type; kernels/backward.cu), and a
# bound of its static shared memory
_ROW_SHARED, _SHARED_STATIC = 131072, 1024
STAT_ROWS = 7  # rows of a statistics buffer (kernels/reduce.cuh, STAT_*)
_CENTER, _INVSTD, _LO, _M2 = 0, 1, 2, 6
_FLAGS = (np.int32(0), np.int32(1))  # int kernel flags, made once


def unavailable_reason() -> str | None:
    """Why the CuPy backend cannot run here, or ``None`` when it can."""
    return _cuda.runtime().unavailable_reason()


def require() -> Any:
    """Return the array module, or raise :class:`BackendUnavailableError` saying what is missing."""
    return _cuda.runtime().require()


def is_array(value: Any) -> bool:
    """True for an array of this backend's kind."""
    return bool(_cuda.runtime().is_array(value))


def __getattr__(attr: str) -> Any:
    if attr == "xp":  # the array module, imported on first use
        return require()
    raise AttributeError(attr)


def asarray(a: Any) -> Any:
    """A CuPy array for ``a`` (NumPy arrays are copied to the current device)."""
    return require().asarray(a)


def device_summary() -> str:
    """What the backend runs on: name, compute capability and memory of the current device."""
    return str(_cuda.runtime().describe())


def _index(size: int) -> tuple[str, Any]:
    return ("unsigned int", np.uint32) if size < _INDEX64_FROM else \
        ("unsigned long long", np.uint64)


def _ptr(a: Any) -> Any:
    return NULL if a is None else a


def _launch(dtype: str, name: str, grid: int, args: tuple, block: int = _THREADS,
            shared: int = 0) -> None:
    if shared > _cuda.SHARED_DEFAULT:
        _cuda.kernel_with_shared(dtype, name)((grid,), (block,), args, shared_mem=shared)
    elif shared:
        _cuda._runtime.kernel(dtype, name)((grid,), (block,), args, shared_mem=shared)
    else:
        _cuda._runtime.kernel(dtype, name)((grid,), (block,), args)


# ---------------------------------------------------------------------------------------------
# Batch norm: per-channel statistics over a contiguous (rows, C, inner) or (rows, C) view.

_CLUSTER = 32  # splits merged per cluster in channels-last reductions (kernels/reduce.cuh)
# Shared memory of the evaluation apply's per-block coefficients (3 rows of C): at most 2048
# channels in float (1024 in double), 4 blocks of 256 threads still resident per SM
_EVAL_TABLE = 24576


def _offset(x: Any, *others: Any, lag: int | None = None) -> int:
    """The common byte offset of the arrays' addresses from a 16-byte boundary (``lag``: x's,
    when the caller has it; None among ``others`` skipped), or -1 when they differ (then nothing
    is loaded 16 bytes at a time)."""
    offset = x.data.ptr % 16 if lag is None else lag
    for a in others:
        if a is not None and a.data.ptr % 16 != offset:
            return -1
    return offset


def _remember(table: dict, key: tuple, make: Callable[..., Any]) -> Any:
    """``make(*key)`` kept in ``table`` (a hot path's lookup in front of a cache; cleared when it
    holds 1024)."""
    if len(table) >= 1024:
        table.clear()
    made = table[key] = make(*key)
    return made


class _Geometry:
    """How one contiguous array is walked: layout, vector widths, index type, grids, scratch.

    ``offset`` is the common misalignment of the arrays involved (:func:`_offset`): elementwise
    launches load 16 bytes at a time after ``head`` single values whenever it is the same for all;
    channel-first reductions too (each channel plane from its own first 16-byte boundary);
    channels-last reductions need aligned arrays and C a multiple of the vector width.
    """

    def __init__(self, shape: tuple[int, ...], axis: int, dtype: np.dtype, offset: int,
                 sms: int, samples: int = 1) -> None:
        self.offset = offset  # every array's when >= 0 (then outputs are made at it)
        self.rows = math.prod(shape[:axis])
        self.channels = shape[axis]
        inner = math.prod(shape[axis + 1:])
        size = self.rows * self.channels * inner
        # Channels-last kernels whenever channels are innermost: (N, C) too.
        self.cl = inner == 1
        vector = 16 // dtype.itemsize
        shared = offset >= 0 and offset % dtype.itemsize == 0
        self.head = (16 - offset) % 16 // dtype.itemsize if shared else 0
        self.apply_width = vector if shared else 1
        if self.cl:
            self.width = vector if offset == 0 and self.channels % vector == 0 else 1
            self.head_reduce = 0
        else:
            self.width = self.apply_width
            self.head_reduce = self.head
        self.index, self.itype = _index(size)
        self.dtype, self.acc = dtype.name, _ACC[dtype]
        self.acc_type = self.acc.type
        unroll = 2 if self.width >= 8 else 4
        if self.cl:
            self.inner_arg = self.channels // self.width
            self.lanes = min(32, 1 << max(0, (self.inner_arg - 1).bit_length()))
            self.groups = -(-self.inner_arg // self.lanes)
            trips = self.rows // (_THREADS // self.lanes * unroll * 2)
        else:
            self.inner_arg = inner
            self.lanes = 1
            self.groups = self.channels
            trips = self.rows * (inner // self.width) // (_THREADS * unroll * 2)
        # Blocks per channel (group): C * splits fills the GPU ~8 blocks per SM deep, but every
        # thread keeps at least two unrolled trips of work. Channels-last data may stack
        # `samples` such (rows, C) views (per-sample statistics: GroupNorm, InstanceNorm).
        self.splits = max(1, min(-(-sms * 8 // (self.groups * samples)), trips or 1, 1024))
        self.reduce_blocks = samples * self.groups * self.splits
        cells = samples * self.channels
        if self.cl:  # partials of every split, then of every cluster; counters per level
            clusters = -(-self.splits // _CLUSTER)
            self.partials = cells * (self.splits + clusters)
            self.counters = samples * self.groups * (clusters + 1)
        else:
            self.partials, self.counters = cells * self.splits, cells
        self.apply_blocks = max(1, min(-(-max(size // self.apply_width, self.channels)
                                         // _THREADS), sms * 32))
        # Evaluation: every block first computes every channel's coefficients into shared memory
        # (kernels: apply, eval = 2) where they fit _EVAL_TABLE, on a grid of 4 * C values a
        # block or more (unless that leaves SMs idle); else per value (eval = 1).
        table = 3 * (-(-self.channels // 4) * 4) * self.acc.itemsize
        self.eval_shared = table if table <= _EVAL_TABLE else 0
        self.eval_mode = np.int32(2 if self.eval_shared else 1)
        self.eval_blocks = min(self.apply_blocks, max(sms, -(-size // (4 * self.channels)))) \
            if self.eval_shared else self.apply_blocks
        it = self.itype
        self.reduce_shape = (it(self.rows), it(self.channels), it(self.inner_arg),
                             it(self.head_reduce), np.int32(self.splits), np.int32(self.lanes))
        self.apply_shape = (it(size), it(self.head), it(self.channels), it(inner))
        layout = "true" if self.cl else "false"
        ctype = _cuda.CTYPES[self.dtype]
        self.names = {k: f"bncupy::{k}<{ctype}, {w}, {self.index}, {layout}>"
                      for k, w in (("forward_stats", self.width), ("backward_reduce", self.width),
                                   ("apply", self.apply_width),
                                   ("backward_apply", self.apply_width))}
        self.count = np.float64(self.rows * inner)
        c = self.channels
        self.stats_scratch = ((self.acc, 3 * self.partials),)
        self.grad_scratch = ((self.acc, 2 * self.partials), (self.acc, 4 * c))
        # the scratch with the statistics buffer as a workspace temporary (see _with_stats)
        self.stats_temp = (*self.stats_scratch, (self.acc, (STAT_ROWS, c)))
        self.eps: tuple[float, Any] = (math.nan, None)  # the last eps and its kernel argument

    def eps_arg(self, eps: float) -> Any:
        """``eps`` as the accumulator-typed kernel argument (made once per value in a row)."""
        last = self.eps
        if last[0] == eps:
            return last[1]
        arg = self.acc_type(eps)
        self.eps = (eps, arg)
        return arg

    def launch_reduce(self, kernel: str, grid: int, args: tuple, shared: int = 0) -> None:
        if shared:
            _cuda._runtime.kernel(self.dtype, self.names[kernel])((grid,), (_THREADS,), args,
                                                                 shared_mem=shared)
        else:
            _cuda._runtime.kernel(self.dtype, self.names[kernel])((grid,), (_THREADS,), args)


@functools.lru_cache(maxsize=1024)
def _geometry_cached(shape: tuple[int, ...], axis: int, dtype: np.dtype, offset: int,
                     sms: int, index64_from: int) -> _Geometry:
    return _Geometry(shape, axis, dtype, offset, sms)


_GEOMETRIES: dict[tuple, _Geometry] = {}  # the hot path's lookup in front of _geometry_cached


def _geometry(x: Any, axis: int, *others: Any) -> _Geometry:
    """The cached geometry of ``x`` (with ``others`` of its shape walked alongside)."""
    key = (x.shape, axis, x.dtype, _offset(x, *others), _cuda._runtime.sm_count(),
           _INDEX64_FROM)
    return _GEOMETRIES.get(key) or _remember(_GEOMETRIES, key, _geometry_cached)


def _output_like(x: Any, lag: int | None = None) -> Any:
    """A new array like contiguous ``x`` at the same offset from a 16-byte boundary, so that the
    kernels read and write both 16 bytes at a time (a view into a slightly larger allocation
    when ``x`` is a view off the boundary). ``lag``: that offset, when the caller has it (a
    geometry's: -1 where its arrays' offsets differ)."""
    xp = _cuda._runtime.xp
    if lag is None or lag < 0:
        lag = x.data.ptr % 16
    if lag == 0:
        return xp.empty_like(x)
    flat = xp.empty(x.size + 16 // x.itemsize, x.dtype)
    start = (lag - flat.data.ptr % 16) % 16 // x.itemsize
    return flat[start:start + x.size].reshape(x.shape)


def _contiguous(a: Any) -> Any:
    return a if a is None or a.flags.c_contiguous else require().ascontiguousarray(a)


def _like(a: Any, x: Any) -> Any:
    """``a`` (grad_output, residual) as a contiguous array of ``x``'s dtype, or None."""
    if a is None or (a.dtype == x.dtype and a.flags.c_contiguous):
        return a
    return require().ascontiguousarray(a, dtype=x.dtype)


def _per_channel(value: Any, acc: np.dtype) -> Any:
    """A contiguous accumulator-typed per-channel vector (the argument itself when it is one)."""
    if value is None or (value.dtype == acc and value.flags.c_contiguous):
        return value
    return require().ascontiguousarray(value, dtype=acc)


def _workspace(counters: int, layout: tuple) -> tuple[Any, ...]:
    """The stream's arrival counters and scratch views of ``layout``: ``(dtype, count)`` (or
    ``(dtype, shape)``) pairs."""
    return _cuda.bind(_cuda._runtime.current_stream(), counters, layout)


def _apply(x: Any, geo: _Geometry, stats: Any, residual: Any, running_mean: Any,
           running_var: Any, weight: Any, bias: Any, eps: float, momentum: float,
           evaluate: bool, relu: bool) -> Any:
    y = _output_like(x, geo.offset)
    geo.launch_reduce("apply", geo.eval_blocks if evaluate else geo.apply_blocks, (
        x, y, NULL if residual is None else residual, *geo.apply_shape, stats,
        NULL if running_mean is None else running_mean,
        NULL if running_var is None else running_var, NULL if weight is None else weight,
        NULL if bias is None else bias, geo.eps_arg(eps), np.float64(momentum),
        geo.eval_mode if evaluate else _FLAGS[0], _FLAGS[relu]),
        geo.eval_shared if evaluate else 0)
    return y


def _with_stats(counters: int, layout: tuple, width: int, acc: np.dtype,
                keep: Any, temp: tuple | None = None) -> tuple[Any, ...]:
    """The workspace's counters and views of ``layout``, and a (STAT_ROWS, width) statistics
    buffer: a fresh array when the caller keeps it (True), one of a layer's
    :class:`StatBuffers` (given as ``keep``), else the workspace's (a temporary must not be an
    allocation freed after the call: a CUDA graph capturing the call would keep writing it).
    ``temp``: ``layout`` with that buffer appended, when the caller has it made."""
    if not keep:
        return _workspace(counters, temp or (*layout, (acc, (STAT_ROWS, width))))
    stats = _cuda._runtime.xp.empty((STAT_ROWS, width), acc) if keep is True else \
        keep.take(width, acc)
    if counters == 0 and not layout:  # nothing of the workspace wanted
        return (None, stats)
    return (*_workspace(counters, layout), stats)


class StatBuffers:
    """A layer's own statistics buffers: a forward pass given them as ``keep`` writes one of
    them instead of a new array. Two per (runtime, device, width, dtype), taken in turn: never
    the one the layer's last forward filled (``saved``, set by the layer after a call that
    succeeded), so a call that fails half-way leaves that forward's statistics whole. Their row
    views are made once (:func:`_row`), so a layer's steps allocate no statistics and make no
    views of them. Only the last width's pair and the saved buffer's are kept (LayerNorm's
    width is the number of rows, which may change every call)."""

    __slots__ = ("owner", "pairs", "saved")

    def __init__(self, owner: int = 0) -> None:
        self.owner = owner  # id() of the layer (a shallow copy of it must not share them)
        self.pairs: dict[tuple, list] = {}
        self.saved: Any = None

    def take(self, width: int, acc: np.dtype) -> Any:
        rt = _cuda._runtime
        key = (rt, rt.device_id(), width, acc)
        pair = self.pairs.get(key)
        if pair is None:
            self._drop(lambda pair: all(buf is not self.saved for buf in pair))
            pair = self.pairs[key] = []
        for buf in pair:
            if buf is not self.saved:
                return buf
        buf = rt.xp.empty((STAT_ROWS, width), acc)
        _ROWS[id(buf)] = (buf, [None] * STAT_ROWS)
        pair.append(buf)
        return buf

    def _drop(self, which: Callable[[list], bool]) -> None:
        for key, pair in list(self.pairs.items()):
            if which(pair):
                del self.pairs[key]
                for buf in pair:
                    _ROWS.pop(id(buf), None)

    def __reduce__(self) -> tuple:  # a copied or pickled layer starts with buffers of its own
        return (StatBuffers, ())

    @staticmethod
    def of(layer: Any) -> StatBuffers:
        """``layer``'s own (made on first use, and again for a copy of the layer)."""
        found = layer.__dict__.get("_stat_buffers")
        if found is None or found.owner != id(layer):
            found = layer.__dict__["_stat_buffers"] = StatBuffers(id(layer))
        return found

    def __del__(self) -> None:
        self._drop(lambda pair: True)


_ROWS: dict[int, tuple[Any, list]] = {}  # StatBuffers' buffers by id: (buffer, row views)


def _row(stats: Any, k: int) -> Any:
    """Row ``k`` of a statistics buffer (a view made once for a layer's :class:`StatBuffers`)."""
    found = _ROWS.get(id(stats))
    if found is None or found[0] is not stats:
        return stats[k]
    rows = found[1]
    row = rows[k]
    if row is None:
        row = rows[k] = stats[k]
    return row


def _stats(x: Any, geo: _Geometry, weight: Any, bias: Any, eps: float,
           keep: Any = True) -> Any:
    """Launch ``forward_stats``; returns its STAT-row buffer (STAT_ROWS, C)."""
    counters, partials, stats = _with_stats(geo.counters, geo.stats_scratch, geo.channels,
                                            geo.acc, keep, geo.stats_temp)
    geo.launch_reduce("forward_stats", geo.reduce_blocks, (
        x, *geo.reduce_shape, partials, counters, NULL if weight is None else weight,
        NULL if bias is None else bias, geo.eps_arg(eps), geo.count, stats, _FLAGS[0]))
    return stats


def stat_rows(stats: Any) -> tuple[Any, Any]:
    """save_mean and save_invstd: rows of a forward's statistics buffer."""
    return _row(stats, _CENTER), _row(stats, _INVSTD)


class Plan:
    """What a checked call signature fixes for the launch plan (the caller keeps one per
    signature; see :func:`plan`): whether its arrays go to the kernels as they are, and its
    geometries by alignment and SM count."""

    __slots__ = ("axis", "direct", "geometries")

    def __init__(self, x: Any, axis: int, arrays: tuple, vectors: tuple) -> None:
        acc = _ACC[x.dtype]
        self.axis = axis
        self.direct = x.flags.c_contiguous and all(
            a is None or (a.dtype == x.dtype and a.flags.c_contiguous) for a in arrays) and all(
            v is None or (v.dtype == acc and v.flags.c_contiguous) for v in vectors)
        self.geometries: dict[tuple, _Geometry] = {}

    def geometry(self, x: Any, *others: Any) -> _Geometry:
        """:func:`_geometry` of ``x`` (of the signature's shape and dtype) by its alignment."""
        key = (_offset(x, *others), _cuda._runtime.sm_count(), _INDEX64_FROM)
        geo = self.geometries.get(key)
        if geo is None:
            geo = self.geometries[key] = _geometry(x, self.axis, *others)
        return geo


def plan(x: Any, axis: int, arrays: tuple = (), vectors: tuple = ()) -> Plan:
    """The :class:`Plan` of a call signature: ``x`` (its view as the backend gets it), the
    input-shaped ``arrays`` (residual, grad_output) and the per-channel ``vectors``."""
    return Plan(x, axis, arrays, vectors)


def _forward_operands(x: Any, axis: int, residual: Any, vectors: tuple,
                      plan: Plan | None) -> tuple[Any, Any, _Geometry, tuple]:
    """``x``, ``residual``, the geometry and the per-channel ``vectors`` as the kernels take
    them: as they are when the call signature's plan says so, else contiguous and typed."""
    if plan is not None and plan.direct:
        return x, residual, plan.geometry(x, residual), vectors
    if not x.flags.c_contiguous:
        x = require().ascontiguousarray(x)
    if residual is not None:
        residual = _like(residual, x)
    geo = _geometry(x, axis, residual)
    return x, residual, geo, tuple(_per_channel(v, geo.acc) for v in vectors)


def normalize_train(x: Any, axis: int, weight: Any, bias: Any, eps: float, running_mean: Any,
                    running_var: Any, momentum: float, residual: Any = None,
                    relu: bool = False, keep: Any = True,
                    plan: Plan | None = None) -> tuple[Any, Any, None, None, Any]:
    """Two launches: statistics, then apply (whose first threads also move the running
    statistics). Returns ``y``, the statistics buffer (the precise mean for a backward pass,
    save_mean and save_invstd in :func:`stat_rows`), None twice, and the buffer again (the
    apply coefficients); unless ``keep``, the buffer is the stream's workspace. ``plan``: the
    call signature's (:func:`plan` of ``x``, ``(residual,)`` and the four vectors)."""
    if plan is not None and plan.direct:
        geo, rm, rv = plan.geometry(x, residual), running_mean, running_var
    else:
        x, residual, geo, (rm, rv, weight, bias) = _forward_operands(
            x, axis, residual, (running_mean, running_var, weight, bias), plan)
    if x.size == 0:
        raise ValueError("normalize_train needs values (the caller handles empty batches)")
    stats = _stats(x, geo, weight, bias, eps, keep)
    y = _apply(x, geo, stats, residual, rm, rv, weight, bias, eps, momentum, False, relu)
    # a non-contiguous or differently typed running-stat array was copied: write it back
    if rm is not running_mean:
        running_mean[...] = rm
    if rv is not running_var:
        running_var[...] = rv
    return y, stats, None, None, stats


def normalize_eval(x: Any, axis: int, running_mean: Any, running_var: Any, weight: Any,
                   bias: Any, eps: float, residual: Any = None, relu: bool = False,
                   keep: Any = True, plan: Plan | None = None,
                   ) -> tuple[Any, Any, None, None, Any]:
    """One launch: apply with coefficients from the running statistics (its first threads also
    write them into the statistics buffer for a backward pass). Returns as
    :func:`normalize_train`."""
    x, residual, geo, (rm, rv, weight, bias) = _forward_operands(
        x, axis, residual, (running_mean, running_var, weight, bias), plan)
    stats = _with_stats(0, (), geo.channels, geo.acc, keep, geo.stats_temp[-1:])[-1]
    y = _apply(x, geo, stats, residual, rm, rv, weight, bias, eps, 0.0, True, relu)
    return y, stats, None, None, stats


def _mean_parts(mean: Any, acc: np.dtype, saved: bool, direct: bool = False,
                ) -> tuple[Any, Any]:
    """(center, lo) of a mean: a statistics buffer's rows (``saved``), or a given vector of any
    shape (lo null; as it is when the call signature's plan vouches for it, ``direct``)."""
    if saved:  # the buffer itself is its first row's pointer (_CENTER = 0): no view
        return mean, _row(mean, _LO)
    if direct:
        return mean, None
    if mean.dtype.itemsize > acc.itemsize:  # a float64 mean of float32 data: split
        center = mean.astype(acc)
        return center, (mean - center).astype(acc)
    return _per_channel(mean, acc), None


def backward(dy: Any, x: Any, axis: int, weight: Any, mean: Any, invstd: Any, training: bool,
             fused: tuple | None = None, plan: Plan | None = None, sums: bool = False,
             ) -> tuple[Any, Any, Any, Any]:
    """Two launches: the deterministic reduction, whose last blocks write grad_weight,
    grad_bias and the dx coefficients, and the elementwise dx.

    ``mean`` is a statistics buffer (a forward's, precise) or a vector, ``invstd`` a vector or
    None (then the buffer's row); ``fused`` is a fused forward's ``(coefficients, residual)``:
    the ReLU mask is applied to ``dy`` inline. Returns dx, grad_weight, grad_bias and, with a
    fused residual, its gradient (else None). ``plan``: the call signature's (:func:`plan` of
    ``x``, ``(dy, residual)`` and ``(weight, mean, invstd)``). ``sums``: the reduction alone
    (dx None).
    """
    fwd, residual = fused if fused is not None else (None, None)
    direct = False  # the plan vouches for the vectors: contiguous and accumulator-typed
    if plan is not None and plan.direct:
        geo, direct = plan.geometry(x, dy, residual), True
    else:
        if not x.flags.c_contiguous:
            x = require().ascontiguousarray(x)
        dy = _like(dy, x)
        if residual is not None:
            residual = _like(residual, x)
        geo = _geometry(x, axis, dy, residual)
        weight = _per_channel(weight, geo.acc)
    center, lo = _mean_parts(mean, geo.acc, mean.ndim == 2, direct)
    if invstd is None:
        invstd = _row(mean, _INVSTD)
    elif not direct:
        invstd = _per_channel(invstd, geo.acc)
    counters, partials, coef = _workspace(geo.counters, geo.grad_scratch)
    xp = _cuda._runtime.xp
    grad_weight, grad_bias = xp.empty(geo.channels, geo.acc), xp.empty(geo.channels, geo.acc)
    if not sums:
        dx = _output_like(x, geo.offset)
        g = _output_like(x, geo.offset) if fwd is not None and residual is not None else None
    geo.launch_reduce("backward_reduce", geo.reduce_blocks, (
        dy, x, NULL if residual is None else residual, *geo.reduce_shape, partials, counters,
        center, NULL if lo is None else lo, invstd, NULL if weight is None else weight,
        NULL if fwd is None else fwd, geo.count, _FLAGS[bool(training)], grad_weight,
        grad_bias, coef))
    if sums:
        return None, grad_weight, grad_bias, None
    geo.launch_reduce("backward_apply", geo.apply_blocks, (
        dy, x, NULL if residual is None else residual, dx, NULL if g is None else g,
        *geo.apply_shape, coef, NULL if fwd is None else fwd))
    return dx, grad_weight, grad_bias, g


def stats(x: Any, axis: int) -> tuple[int, Any, Any]:
    """Per-channel ``(count, mean, m2)``: the mean in float64, m2 in the accumulator dtype."""
    x = _contiguous(x)
    c = x.shape[axis]
    count = x.size // c if c else 0
    if count == 0:
        xp = require()
        return 0, xp.zeros(c, _ACC[x.dtype]), xp.zeros(c, _ACC[x.dtype])
    out = _stats(x, _geometry(x, axis), None, None, 1.0)
    return count, out[_CENTER].astype(np.float64) + out[_LO], out[_M2]


def relu_grad(dy: Any, x: Any, axis: int, coef: Any, residual: Any) -> Any:
    """``dy`` where the fused forward's output was positive, else 0 (one elementwise launch)."""
    x = _contiguous(x)
    dy, residual = _like(dy, x), _like(residual, x)
    g = _output_like(x)
    geo = _geometry(x, axis, dy, g, residual)
    geo.launch_reduce("backward_apply", geo.apply_blocks, (dy, x, _ptr(residual), NULL, g,
                                                           *geo.apply_shape, NULL, coef))
    return g


def backward_sums(dy: Any, x: Any, axis: int, mean: Any, invstd: Any) -> tuple[Any, Any]:
    """Per-channel float64 ``sum(dy)`` and ``sum(dy * (x - mean))`` (one reduction launch)."""
    xp = require()
    ones = xp.ones(x.shape[axis], _ACC[x.dtype])
    _, sum_dy_xmu, sum_dy, _ = backward(dy, x, axis, None, mean.astype(xp.float64), ones, False,
                                        sums=True)
    return sum_dy.astype(xp.float64), sum_dy_xmu.astype(xp.float64)


def backward_apply(dy: Any, x: Any, axis: int, center: Any, a: Any, b: Any, c: Any) -> Any:
    """``a * dy + b * (x - center) + c`` per channel (one elementwise launch)."""
    xp = require()
    x = _contiguous(x)
    dy = _like(dy, x)
    geo = _geometry(x, axis, dy)
    coef = xp.stack([v.astype(geo.acc) for v in (center, a, b, c)])
    dx = _output_like(x)
    geo.launch_reduce("backward_apply", geo.apply_blocks, (
        dy, x, NULL, dx, NULL, *geo.apply_shape, coef, NULL))
    return dx


def normalize_with(x: Any, axis: int, mean: Any, invstd: Any, weight: Any, bias: Any,
                   residual: Any = None, relu: bool = False) -> tuple[Any, Any]:
    """Apply given (e.g. globally merged) statistics; returns ``y`` and the coefficients."""
    xp = require()
    x = _contiguous(x)
    residual = _like(residual, x)
    geo = _geometry(x, axis, residual)
    center, scale, shift = forward_coefficients(mean, invstd, weight, bias, x.dtype)
    stats = xp.zeros((STAT_ROWS, geo.channels), geo.acc)
    for row, value in ((0, center), (1, invstd), (3, scale), (4, shift)):
        stats[row] = value
    y = _apply(x, geo, stats, residual, None, None, None, None, 1.0, 0.0, False, relu)
    return y, stats


# ---------------------------------------------------------------------------------------------
# Normalizations over groups (LayerNorm, GroupNorm, InstanceNorm; see _groups.GroupLayout).

class _GroupGeometry:
    """The launches of one group layout: statistics, apply and backward.

    Rows (LayerNorm rows, short channel-first groups) take 16-byte loads when aligned and a
    multiple of the vector width long; the elementwise launches and split reductions whenever
    every tensor has the same misalignment (see :class:`_Geometry`).
    """

    def __init__(self, lay: GroupLayout, dtype: np.dtype, offset: int, sms: int,
                 shared_optin: int = 0) -> None:
        self.lay, self.dtype, self.acc = lay, dtype.name, _ACC[dtype]
        self.acc_type = self.acc.type
        ctype = _cuda.CTYPES[self.dtype]
        vector = 16 // dtype.itemsize
        size = lay.n * lay.c * lay.s
        self.index, itype = _index(size)
        self.itype = itype
        self.groups = lay.groups
        shared = offset >= 0
        self.apply_width = vector if shared else 1
        head = (16 - offset) % 16 // dtype.itemsize if shared else 0
        self.blocks = max(1, min(-(-max(size // self.apply_width, lay.c) // _THREADS), sms * 32))
        inner = lay.c if lay.kind == "rows" else lay.s
        self.shape_args = (itype(size), itype(head), itype(lay.c), itype(inner), itype(lay.k))
        # A row's channel planes (channel-first groups) or the row itself, vector by vector.
        unit = lay.s if lay.kind == "cf" else lay.c
        self.row_width = vector if offset == 0 and unit % vector == 0 else 1
        layout = _cuda.GROUP_LAYOUTS[lay.kind]
        self.names: dict[Any, str] = {
            k: f"bncupy::{k}<{ctype}, {self.apply_width}, {self.index}, {layout}>"
            for k in ("group_apply", "group_backward_apply")}
        self.names.update({k: f"bncupy::{k}<{ctype}, {self.row_width}, {self.index}>"
                           for k in ("row_forward", "row_backward")})
        # row_norm per residual-stream dtype (see _cuda.sum_types)
        self.names.update({("row_norm", np.dtype(h)): f"bncupy::row_norm<{ctype}, "
                           f"{_cuda.CTYPES[h]}, {self.row_width}, {self.index}>"
                           for h in {self.dtype, "float32"}})
        acc = "double" if self.dtype == "float64" else "float"
        self.names.update({k: f"bncupy::{k}<{acc}>" for k in (
            "group_merge", "group_grad_coefficients", "column_sums")})
        # Statistics: rows held in registers (row_norm: one read; enough of them, or short
        # ones, to fill the GPU), a warp to a block per group (row_forward), a split reduction
        # per group (forward_stats: long groups, few of them), or cells merged per group
        # (channels-last).
        group_vecs = lay.size // self.row_width
        # vectors of a row per thread (kernels: row_regs)
        held = max(1, (4 if self.acc.itemsize == 8 or self.row_width == 1 else 16)
                   // self.row_width)
        held_back = max(1, (2 if self.acc.itemsize == 8 else 4 if self.row_width == 1 else 8)
                        // self.row_width)
        # longer rows' backward in shared memory (row_norm_backward_shared)
        held_shared = max(1, (8 if self.acc.itemsize == 8 else 16) // self.row_width)
        many = self.groups >= sms or group_vecs <= 1024
        if lay.kind == "cl":
            self.cells = _Geometry((lay.s, lay.c), 1, dtype, offset, sms, samples=lay.n)
            self.stats_mode = "cells"
            self._name("cell_stats", self.cells.width)
            self._name("cell_grad_cl", self.cells.width)
        elif group_vecs <= held * 1024 and many:
            self.stats_mode = "regs"
            self.regs = _RowPlan(self.groups, group_vecs, held, sms, 0)
            it = itype
            self.regs_shape = (it(self.groups), it(group_vecs), np.int32(self.regs.height),
                               it(lay.s // self.row_width if lay.kind != "rows" else 0),
                               it(lay.c // lay.k), it(lay.k))
        elif lay.kind == "cf" and group_vecs <= _ROWS_MAX_VECS and many:
            self.stats_mode = "rows"
            self.row_height = _row_height(group_vecs)
            self.row_blocks = -(-self.groups // (_THREADS // self.row_height))
        else:
            self.stats_mode = "split"
            self.split = _Geometry((1, self.groups, lay.size), 1, dtype, offset, sms)
        # Backward: LayerNorm rows in registers (row_norm_backward + column_sums), in shared
        # memory where the device has enough (row_norm_backward_shared + column_sums: up to
        # 16384 values, double 8192) or, longer than that, row_backward + column_grads; groups of
        # channels: cell sums.
        # (with grad_sum: 512 threads holding twice as much, see kernels/backward.cu)
        if lay.kind == "rows":
            merge = 2 * lay.c * self.acc.itemsize
            self.back: _RowPlan | None = None
            self.back_sum: _RowPlan | None = None
            kernels = {s: f"row_norm_backward<{ctype}, {self.row_width}, {self.index}, {f}>"
                       for s, f in ((False, "false"), (True, "true"))}
            if group_vecs <= held_back * 1024:
                self.back = _RowPlan(lay.n, group_vecs, held_back, sms, merge)
                self.back_sum = _RowPlan(lay.n, group_vecs, 2 * held_back, sms, merge, 512)
            elif group_vecs <= held_shared * 1024 and \
                    _ROW_SHARED + _SHARED_STATIC <= shared_optin:
                self.back = self.back_sum = _RowPlan(lay.n, group_vecs, held_shared, sms, merge,
                                                     shared=_ROW_SHARED)
                kernels = dict.fromkeys(
                    (False, True),
                    f"row_norm_backward_shared<{ctype}, {self.row_width}, {self.index}>")
            if self.back is not None and self.back_sum is not None:
                # launch arguments that depend on the plan only, made once
                self.back_args = {s: (itype(lay.n), itype(group_vecs), np.int32(p.height))
                                  for s, p in ((False, self.back), (True, self.back_sum))}
                self.sums_args = {s: (np.int32(p.grid), np.uint64(lay.c))
                                  for s, p in ((False, self.back), (True, self.back_sum))}
                self.back_scratch = {s: ((self.acc, 2 * lay.c * p.grid),)
                                     for s, p in ((False, self.back), (True, self.back_sum))}
            for sum_, kernel in kernels.items():
                self.names["row_norm_backward", sum_] = f"bncupy::{kernel}"
            self.columns = _Geometry((lay.n, lay.c), 1, dtype, offset, sms)
            self._name("column_grads", self.columns.width)
        elif lay.kind == "cf":
            cell_vecs = lay.s // self.row_width
            self.cell_height = _row_height(cell_vecs) if cell_vecs <= _ROWS_MAX_VECS else 0
            self.cell_split = _Geometry((1, lay.n * lay.c, lay.s), 1, dtype, offset, sms)
            self._name("cell_grad_planes", self.row_width if self.cell_height else
                       self.cell_split.width)
        self.coef_blocks = -(-max(self.groups, lay.c) // _THREADS)
        self.coef_blocks_columns = -(-lay.c // _THREADS)
        # launch arguments that depend on the layout only, made once
        self.groups_arg = itype(self.groups)
        self.coef_args = (np.uint64(self.groups), np.uint64(lay.c), np.int32(lay.k),
                          np.float64(lay.size))
        self.unbias_arg = np.float64(1.0 / max(lay.s - 1, 1))
        if lay.kind == "cl":
            cells = self.cells
            self.cell_args = (itype(lay.s), itype(cells.inner_arg), np.int32(cells.splits),
                              np.int32(cells.lanes))
            self.merge_args = (np.uint64(self.groups), np.int32(lay.k), np.float64(lay.s))
            self.k_arg, self.cells_arg = itype(lay.k), itype(lay.n * lay.c)
            self.stats_scratch = ((self.acc, 3 * cells.partials), ("float64", lay.n * lay.c),
                                  ("float64", lay.n * lay.c))
            self.grad_scratch = ((self.acc, 2 * cells.partials), ("float64", 2 * lay.n * lay.c),
                                 (self.acc, 2 * self.groups))
        elif lay.kind == "cf":
            split, height = self.cell_split, self.cell_height
            planes = lay.n * lay.c
            self.plane_blocks = -(-planes // (_THREADS // height)) if height else \
                split.reduce_blocks
            self.plane_args = (itype(planes), itype(lay.s),
                               itype(0 if height else split.head_reduce),
                               np.int32(split.splits), np.int32(height))
            self.plane_tail = (itype(lay.c), itype(lay.k))
            self.grad_scratch = ((self.acc, 2 * split.partials), ("float64", 2 * planes),
                                 (self.acc, 2 * self.groups))

    def _name(self, kernel: str, width: int) -> None:
        self.names[kernel] = (f"bncupy::{kernel}<{_cuda.CTYPES[self.dtype]}, {width}, "
                              f"{self.index}>")


class _RowPlan:
    """A launch of the single-read row kernels: `height` threads per row (a power of two from
    32 to ``threads``), slots of rows per block, a grid from the SM count. ``merge_bytes``
    (backward: the slots' column sums in shared memory) above 32 KB keeps one row per block, and
    so does ``shared``, the dynamic shared memory a row takes (backward rows held there)."""

    def __init__(self, rows: int, row_vecs: int, held: int, sms: int, merge_bytes: int,
                 threads: int = 1024, shared: int = 0) -> None:
        self.height = min(threads, max(32, 1 << max(0, (-(-row_vecs // held) - 1).bit_length())))
        self.block = max(self.height, _THREADS)
        self.shared = shared
        if merge_bytes > 32768 or shared:
            self.block = self.height
        slots = self.block // self.height
        # blocks resident per SM: by threads, or one with a row in shared memory (128 KB)
        resident = 1 if shared else max(1, 2048 // self.block)
        self.grid = max(1, min(-(-rows // slots), sms * resident))
        if merge_bytes:  # every block writes its column partials: a few rows per block at least
            self.grid = max(1, min(self.grid, rows // (slots * 8)))


def _row_height(vecs: int) -> int:
    """Threads per row: a warp for short rows up to the whole block for long ones."""
    return min(_THREADS, max(32, 1 << max(0, (vecs // 4 - 1).bit_length())))


@functools.lru_cache(maxsize=1024)
def _group_geometry_cached(lay: GroupLayout, dtype: np.dtype, offset: int, sms: int,
                           index64_from: int, shared_optin: int = 0) -> _GroupGeometry:
    return _GroupGeometry(lay, dtype, offset, sms, shared_optin)


_GROUP_GEOMETRIES: dict[tuple, _GroupGeometry] = {}  # the hot path's lookup in front of the cache


def _group_geometry(x: Any, lay: GroupLayout, *others: Any, lag: int | None = None,
                    ) -> _GroupGeometry:
    """The cached geometry of ``x`` over ``lay`` with ``others`` walked alongside (``lag``: x's
    offset from a 16-byte boundary, when the caller has it)."""
    rt = _cuda._runtime
    key = (lay, x.dtype, _offset(x, *others, lag=lag), rt.sm_count(), _INDEX64_FROM,
           rt.shared_memory_optin())
    return _GROUP_GEOMETRIES.get(key) or _remember(_GROUP_GEOMETRIES, key,
                                                   _group_geometry_cached)


def _group_stats(x: Any, geo: _GroupGeometry, weight: Any, bias: Any, eps: float, y: Any,
                 keep: Any, rms: bool = False, residual: Any = None, h: Any = None,
                 ) -> tuple[Any, bool]:
    """The group statistics (STAT rows, ``groups`` long; the workspace's unless ``keep``); for
    rows (LayerNorm, short channel-first groups) the same launch also writes ``y``: returns
    whether it did. ``rms``: RMSNorm's moments. ``residual`` and ``h`` (row_norm only): the
    residual added to ``x`` and the sum's output (see kernels/forward.cu)."""
    lay, acc = geo.lay, geo.acc
    it = geo.itype
    eps_ = geo.acc_type(eps)
    if geo.stats_mode == "cells":
        cells = geo.cells
        counters, partials, mean, m2, stats = _with_stats(
            cells.counters, geo.stats_scratch, geo.groups, acc, keep)
        _launch(geo.dtype, geo.names["cell_stats"], cells.reduce_blocks, (
            x, *geo.cell_args, partials, counters, mean, m2))
        _launch(geo.dtype, geo.names["group_merge"], -(-geo.groups // _THREADS), (
            mean, m2, *geo.merge_args, eps_, stats))
        return stats, False
    if geo.stats_mode == "regs":
        stats = _with_stats(0, (), geo.groups, acc, keep)[-1]
        plan = geo.regs
        held = h if h is not None else residual if residual is not None else x
        _launch(geo.dtype, geo.names["row_norm", held.dtype], plan.grid, (
            x, y, *geo.regs_shape, NULL if weight is None else weight,
            NULL if bias is None else bias, eps_, stats, NULL if residual is None else residual,
            NULL if h is None else h, _FLAGS[rms]), plan.block)
        return stats, True
    if geo.stats_mode == "rows":
        stats = _with_stats(0, (), geo.groups, acc, keep)[-1]
        per_channel = lay.kind != "rows"
        _launch(geo.dtype, geo.names["row_forward"], geo.row_blocks, (
            x, y, it(geo.groups), it(lay.size // geo.row_width), np.int32(geo.row_height),
            it(lay.s // geo.row_width if per_channel else 0), it(lay.c // lay.k), it(lay.k),
            _ptr(weight), _ptr(bias), eps_, stats, np.int32(rms)))
        return stats, True
    split = geo.split
    counters, partials, stats = _with_stats(split.counters, split.stats_scratch, geo.groups,
                                            acc, keep)
    split.launch_reduce("forward_stats", split.reduce_blocks, (
        x, *split.reduce_shape, partials, counters, NULL, NULL, eps_, split.count, stats,
        np.int32(rms)))
    return stats, False


def group_forward(x: Any, lay: GroupLayout, weight: Any, bias: Any, eps: float,
                  running: tuple | None = None, keep: Any = True, rms: bool = False,
                  residual: Any = None, sum_dtype: Any = None, direct: bool = False,
                  ) -> tuple[Any, Any, Any, Any, Any]:
    """LayerNorm rows and short channel-first groups: one launch; other groups: statistics,
    then one apply launch (channels-last: cell moments, group merge, apply).

    ``running`` is InstanceNorm's ``(running_mean, running_var, momentum)``, moved in the last
    launch. ``rms``: RMSNorm (rows; mean 0). ``residual`` (rows): normalize the sum
    ``h = x + residual`` rounded to the residual's dtype, or to ``sum_dtype`` when given, which
    also returns ``h``. Returns ``y``, the per-group mean and invstd (accumulator dtype), the
    statistics buffer (the precise mean for a backward pass; the stream's workspace unless
    ``keep``) and ``h`` (None without ``sum_dtype``). ``direct``: the caller's call signature
    vouches that ``x`` and ``residual`` are C-contiguous (not looked at again).
    """
    xp = _cuda._runtime.xp
    if not direct:
        x, residual = _contiguous(x), _contiguous(residual)
    stream = sum_dtype if sum_dtype is not None else \
        residual.dtype if residual is not None else None
    lag = x.data.ptr % 16
    y = _output_like(x, lag)  # at x's offset: left out of the geometry's walk
    h = None
    if sum_dtype is not None:
        h = _output_like(x, lag) if sum_dtype == x.dtype else xp.empty(x.shape, sum_dtype)
    if x.size == 0:
        nan = xp.full(lay.groups, np.nan, _ACC[x.dtype])
        return y, nan, nan, None, h
    geo = _group_geometry(x, lay, residual, None if h is None or h.dtype == x.dtype else h,
                          lag=lag)
    if stream is not None and geo.stats_mode != "regs":
        return _sum_first(x, lay, weight, bias, eps, keep, rms, residual, stream, h)
    acc = geo.acc
    weight, bias = _per_channel(weight, acc), _per_channel(bias, acc)
    targets = (None, None) if running is None else running[:2]
    rm, rv = (None, None) if running is None else (_per_channel(r, acc) for r in targets)
    stats, done = _group_stats(x, geo, weight, bias, eps, y, keep, rms, residual, h)
    if not done or rm is not None:
        # rows already written: an empty elementwise range, the launch only moves running stats
        shape = geo.shape_args if not done else (geo.itype(0), *geo.shape_args[1:])
        _launch(geo.dtype, geo.names["group_apply"], geo.blocks, (
            x, y, *shape, stats, NULL if weight is None else weight,
            NULL if bias is None else bias, geo.groups_arg, NULL if rm is None else rm,
            NULL if rv is None else rv, np.float64(0.0 if running is None else running[2]),
            geo.unbias_arg))
    if running is not None:  # a non-contiguous or differently typed one was copied
        for target, value in zip(targets, (rm, rv), strict=True):
            if value is not target:
                target[...] = value
    if not keep:  # a y-only call: no statistics views to make
        return y, None, None, stats, h
    return y, _row(stats, _CENTER), _row(stats, _INVSTD), stats, h


def _sum_first(x: Any, lay: GroupLayout, weight: Any, bias: Any, eps: float, keep: Any,
               rms: bool, residual: Any, stream: Any, h: Any) -> tuple[Any, Any, Any, Any, Any]:
    """Rows too long to hold in registers (over 16384 values): the residual sum as its own
    pass (CuPy operations), then the plain normalization of it."""
    acc = _ACC[x.dtype]
    total = x.astype(acc) if residual is None else x.astype(acc) + residual.astype(acc)
    total = total.astype(stream)
    y, mean, invstd, stats, _ = group_forward(total, lay, weight, bias, eps, None, keep, rms)
    if h is not None:
        h[...] = total
    return y.astype(x.dtype, copy=False), mean, invstd, stats, h


def group_backward(dy: Any, x: Any, lay: GroupLayout, weight: Any, mean: Any, invstd: Any,
                   rms: bool = False, grad_sum: Any = None, saved: bool = False,
                   direct: bool = False) -> tuple[Any, Any, Any]:
    """``dx`` and per-channel (per-column for rows) ``dweight``, ``dbias`` (None for RMSNorm),
    each an array of its own.

    LayerNorm and RMSNorm (``rms``; ``mean`` None): one launch over rows for dx, one reduction
    for the parameter gradients; ``grad_sum`` (rows; may be None) is added to dx (the gradient
    the pre-norm sum receives from its other consumers). Groups of channels: per-(sample,
    channel) sums, then per-group coefficients and the parameter gradients (one small launch),
    then dx. ``mean`` is a forward's statistics buffer (precise) with ``saved``, else a
    contiguous array of the per-group means in group order, like ``invstd`` and ``weight``.
    ``direct``: the caller's call signature vouches that ``x`` and ``dy`` are C-contiguous and
    of one dtype (not looked at again).
    """
    xp = _cuda._runtime.xp
    if not direct:
        x = _contiguous(x)
        dy = _like(dy, x)
    grad_sum = _like(grad_sum, x)
    lag = x.data.ptr % 16
    dx = _output_like(x, lag)  # at x's offset: left out of the geometry's walk
    if x.size == 0:
        return dx, xp.zeros(lay.c, _ACC[x.dtype]), xp.zeros(lay.c, _ACC[x.dtype])
    geo = _group_geometry(x, lay, dy, grad_sum, lag=lag)
    acc, it = geo.acc, geo.itype
    center, lo = (None, None) if mean is None else _mean_parts(mean, acc, saved)
    invstd = invstd if saved else _per_channel(invstd, acc)  # a forward's: contiguous, typed
    weight = _per_channel(weight, acc)
    grad_weight, grad_bias = xp.empty(lay.c, acc), None if rms else xp.empty(lay.c, acc)
    # the optional arrays as kernel arguments (NULL for None), once for every launch below
    center_arg = NULL if center is None else center  # (RMSNorm: no mean)
    lo_arg = NULL if lo is None else lo
    weight_arg = NULL if weight is None else weight
    sum_arg = NULL if grad_sum is None else grad_sum
    bias_arg = NULL if grad_bias is None else grad_bias
    if lay.kind == "rows" and geo.back is not None:
        has_sum = grad_sum is not None
        plan = geo.back_sum if has_sum and geo.back_sum is not None else geo.back
        (partials,) = _workspace(0, geo.back_scratch[has_sum])[1:]
        _launch(geo.dtype, geo.names["row_norm_backward", has_sum], plan.grid, (
            dy, x, dx, *geo.back_args[has_sum], center_arg, lo_arg, invstd, weight_arg,
            partials, sum_arg, _FLAGS[rms]), plan.block, plan.shared)
        _launch(geo.dtype, geo.names["column_sums"], geo.coef_blocks_columns, (
            partials, *geo.sums_args[has_sum], grad_weight, bias_arg))
        return dx, grad_weight, grad_bias
    if lay.kind == "rows":
        cols = geo.columns
        counters, partials = _workspace(cols.counters, ((acc, 2 * cols.partials),))
        height = _row_height(lay.c // geo.row_width)
        _launch(geo.dtype, geo.names["row_backward"], -(-lay.n // (_THREADS // height)), (
            dy, x, dx, it(lay.n), it(lay.c // geo.row_width), np.int32(height), center_arg,
            lo_arg, invstd, weight_arg, sum_arg, np.int32(rms)))
        _launch(geo.dtype, geo.names["column_grads"], cols.reduce_blocks, (
            dy, x, it(lay.n), it(cols.inner_arg), np.int32(cols.splits), np.int32(cols.lanes),
            partials, counters, center_arg, lo_arg, invstd, grad_weight, bias_arg))
        return dx, grad_weight, grad_bias
    if lay.kind == "cf":
        counters, partials, sums, coef = _workspace(geo.cell_split.counters, geo.grad_scratch)
        _launch(geo.dtype, geo.names["cell_grad_planes"], geo.plane_blocks, (
            dy, x, *geo.plane_args, partials, counters, center, lo_arg, *geo.plane_tail, sums))
    else:
        cl = geo.cells
        counters, partials, sums, coef = _workspace(cl.counters, geo.grad_scratch)
        _launch(geo.dtype, geo.names["cell_grad_cl"], cl.reduce_blocks, (
            dy, x, *geo.cell_args, partials, counters, center, lo_arg, geo.k_arg, sums,
            geo.cells_arg))
    _launch(geo.dtype, geo.names["group_grad_coefficients"], geo.coef_blocks, (
        sums, invstd, *geo.coef_args, weight_arg, coef, grad_weight, grad_bias))
    _launch(geo.dtype, geo.names["group_backward_apply"], geo.blocks, (
        dy, x, dx, *geo.shape_args, center, lo_arg, invstd, geo.groups_arg, weight_arg, coef))
    return dx, grad_weight, grad_bias

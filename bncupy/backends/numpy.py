"""NumPy backend: the numerical reference and a multi-threaded CPU fallback.

Every operation sees its input as a 3-D view ``(A, C, B)`` (channel axis in the middle) and walks it
in cache-sized tiles on a thread pool; NumPy's ufuncs and BLAS release the GIL, so tiles run in
parallel. Partial statistics are merged in tile order, so results do not depend on thread timing.

Statistics are computed on shifted data ``x - K``, K a per-channel pilot (the mean of the
channel's first few values), and a tile is re-centred on its own mean when the pilot was poor, so a
huge per-channel mean costs no precision; E[x^2] - E[x]^2 is never used on raw data.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ._common import (
    backward_coefficients,
    compute_dtype,
    forward_coefficients,
    merge,
    merge_equal,
)

name = "numpy"
xp = np

_TILE_ELEMENTS = 1 << 17  # 512 KiB of float32: a tile and its output stay in L2
_MAX_ROW = 4096  # longest float32 row summed in one BLAS call (bounds rounding growth)
_PARALLEL_MIN = 1 << 20  # below this many elements threads cost more than they save
_PILOT_SAMPLE = 256  # values per channel averaged into the pilot
_FOLD_LIMIT = 8.0  # |center * scale| up to which x * scale + shift' loses < 4 bits

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> int:
    env = os.environ.get("BNCUPY_NUM_THREADS")
    if env:
        return max(1, int(env))
    return min(os.cpu_count() or 1, 8)


def _map(fn: Callable[[Any], Any], items: list[Any], elements: int) -> list[Any]:
    """``[fn(item) for item in items]``; on the thread pool when the work is big enough, each
    thread taking one contiguous run of items (one task per thread keeps overhead low)."""
    global _pool
    workers = _threads()
    if elements < _PARALLEL_MIN or len(items) < 2 or workers == 1:
        return [fn(item) for item in items]
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="bncupy")
    runs = np.array_split(np.arange(len(items)), min(workers, len(items)))
    futures = [_pool.submit(lambda idx: [fn(items[i]) for i in idx], run) for run in runs]
    return [result for future in futures for result in future.result()]


def asarray(a: Any) -> np.ndarray:
    """A NumPy view/copy of ``a`` (CuPy arrays are copied to the host)."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def view3(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` as ``(A, C, B)`` with the channel axis in the middle (a copy only when strides force it)."""
    a = int(np.prod(x.shape[:axis], dtype=np.int64))
    b = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
    return x.reshape(a, x.shape[axis], b)


Tile = tuple[slice, slice, slice]  # rows of A, channels, columns of B


def _tiles(shape: tuple[int, int, int]) -> list[Tile]:
    """Contiguous blocks of about ``_TILE_ELEMENTS`` of an ``(A, C, B)`` array, in a fixed order:
    whole ``(C, B)`` planes when they are small, else channel runs of one row, else (very long
    rows) column runs of one channel."""
    a, c, b = shape
    if a == 0 or b == 0 or c == 0:
        return []
    every = slice(None)
    if c * b <= _TILE_ELEMENTS:
        step = _TILE_ELEMENTS // (c * b)
        return [(slice(i, min(i + step, a)), every, every) for i in range(0, a, step)]
    if b <= _TILE_ELEMENTS:
        step = max(1, _TILE_ELEMENTS // b)
        return [(slice(i, i + 1), slice(j, min(j + step, c)), every)
                for i in range(a) for j in range(0, c, step)]
    return [(slice(i, i + 1), slice(j, j + 1), slice(k, min(k + _TILE_ELEMENTS, b)))
            for i in range(a) for j in range(c) for k in range(0, b, _TILE_ELEMENTS)]


def _block(a3: np.ndarray, tile: Tile) -> np.ndarray:
    """The 3-D ``(rows, channels, cols)`` block of a tile."""
    return a3[tile]


def _part(a3: np.ndarray, tile: Tile) -> np.ndarray:
    """A tile for elementwise work: 2-D ``(rows, channels)`` when ``B == 1``, so that
    per-channel vectors broadcast along a contiguous inner loop (channels-last layouts)."""
    rows, chans, cols = tile
    return a3[rows, chans, 0] if a3.shape[2] == 1 else a3[rows, chans, cols]


def _per_channel(v: np.ndarray, a3: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A per-channel vector shaped to broadcast against :func:`_part` tiles of ``a3``; index it
    with a tile's channel slice."""
    v = v.astype(dtype)
    return v if a3.shape[2] == 1 else v[:, None]


def _rowdot(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """``sum(d * e, axis=-1)`` without a temporary (BLAS dot per row on NumPy >= 2)."""
    vecdot = getattr(np, "vecdot", None)
    return vecdot(d, e) if vecdot is not None else np.einsum("...i,...i->...", d, e)


def _channel_sum(d: np.ndarray, e: np.ndarray | None = None) -> np.ndarray:
    """Per-channel float64 ``sum(d)`` (or ``sum(d * e)``) of a ``(rows, channels, cols)`` block.

    Rows are summed by BLAS in the compute dtype, at most ``_MAX_ROW`` long where the length
    allows the split; row sums are combined in float64.
    """
    if d.shape[2] == 1:
        d2 = d[:, :, 0]
        if e is None:
            return (np.ones(d.shape[0], d.dtype) @ d2).astype(np.float64)
        return np.einsum("ac,ac->c", d2, e[:, :, 0]).astype(np.float64)
    if d.shape[2] > _MAX_ROW and d.shape[2] % _MAX_ROW == 0 and d.flags.c_contiguous and \
            (e is None or e.flags.c_contiguous):
        split = (*d.shape[:2], d.shape[2] // _MAX_ROW, _MAX_ROW)
        d = d.reshape(split)
        e = None if e is None else e.reshape(split)
    rows = d @ np.ones(d.shape[-1], d.dtype) if e is None else _rowdot(d, e)
    return rows.reshape(d.shape[0], d.shape[1], -1).sum(axis=(0, 2), dtype=np.float64)


def _tile_moments(x3: np.ndarray, tile: Tile, shift: np.ndarray | None, dtype: np.dtype,
                  ) -> tuple[int, np.ndarray, np.ndarray]:
    """Welford partial of one tile from sums of ``x - shift`` (``x`` itself when shift is None).

    If the shift is so far from the tile's mean that ``sum(d^2) - n*mean(d)^2`` would cancel more
    than two bits, the tile is summed again around its own mean.
    """
    xs = _block(x3, tile)
    n = xs.shape[0] * xs.shape[2]
    if shift is not None:
        shift = shift[tile[1]]
    for _ in range(3):
        if shift is None:
            d = xs if xs.dtype == dtype else xs.astype(dtype)
        else:
            d = np.subtract(xs, shift[:, None], dtype=dtype)
        mean = _channel_sum(d) / n
        sq = _channel_sum(d, d)
        if not np.any(n * mean * mean > 0.75 * sq):
            break
        base = np.zeros(mean.shape, dtype) if shift is None else shift
        shift = (base + mean).astype(dtype)
    m2 = np.maximum(sq - n * mean * mean, 0.0)
    return n, mean if shift is None else shift.astype(np.float64) + mean, m2


def _pilot(x3: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """Per-channel shift for the statistics: the mean of the first ~``_PILOT_SAMPLE`` values, or
    None (no shift) when every channel's sample is already centred within one deviation."""
    a, _, b = x3.shape
    rb = min(b, _PILOT_SAMPLE)
    ra = min(a, max(1, _PILOT_SAMPLE // rb))
    sample = x3[:ra, :, :rb].astype(np.float64)
    mean = sample.mean(axis=(0, 2))
    if x3.dtype == dtype and sample.size > x3.shape[1] and \
            np.all(mean * mean <= sample.var(axis=(0, 2))):
        return None
    return mean.astype(dtype)


def _row_moments(x3: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Statistics of centred, contiguous, channel-first data: every (a, c) row is a Welford
    partial summed by BLAS in one sweep over the array; rows whose own mean is too far from 0
    for ``sum(x^2) - n*mean^2`` are summed again around that mean; then one k-way merge."""
    a, c, b = x3.shape
    x2 = x3.reshape(a * c, b)
    ones = np.ones(b, x3.dtype)
    halves = [slice(0, x2.shape[0] // 2), slice(x2.shape[0] // 2, None)]
    sums = _map(lambda rows: (x2[rows] @ ones, _rowdot(x2[rows], x2[rows])), halves, x2.size)
    s = np.concatenate([part[0] for part in sums]).astype(np.float64)
    q = np.concatenate([part[1] for part in sums]).astype(np.float64)
    mean = s / b
    for _ in range(2):
        bad = b * mean * mean > 0.75 * q
        if not bad.any():
            break
        shift = mean[bad].astype(x3.dtype)
        d = x2[bad] - shift[:, None]
        s_d = (d @ ones).astype(np.float64)
        q[bad] = _rowdot(d, d).astype(np.float64)
        mean[bad] = shift.astype(np.float64) + s_d / b
        s[bad] = s_d
    m2 = np.maximum(q - s * s / b, 0.0)
    return merge_equal(mean.reshape(a, c), m2.reshape(a, c), b)


def stats(x: np.ndarray, axis: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Per-channel Welford partials ``(count, mean, m2)`` of ``x`` (float64 mean and m2)."""
    x3 = view3(x, axis)
    tiles = _tiles(x3.shape)
    a, c, b = x3.shape
    count, mean, m2 = np.zeros(c, np.int64), np.zeros(c), np.zeros(c)
    if tiles:
        cd = compute_dtype(x.dtype)
        shift = _pilot(x3, cd)
        if shift is None and 1 < b <= _MAX_ROW and x3.flags.c_contiguous:
            return _row_moments(x3)
        # Channels-last sums of squares go through einsum, which threads slow down here.
        parts = _map(lambda t: _tile_moments(x3, t, shift, cd), tiles, x.size if b > 1 else 0)
        for tile, part in zip(tiles, parts, strict=True):  # tile order: deterministic
            chans = tile[1]
            count[chans], mean[chans], m2[chans] = merge(
                (count[chans], mean[chans], m2[chans]), part)
    return a * b, mean, m2


def _saved(x: np.ndarray, mean: np.ndarray, invstd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dtype = compute_dtype(x.dtype)  # per-channel outputs: float32, or float64 for float64 input
    return mean.astype(dtype), invstd.astype(dtype)


def normalize_train(x: np.ndarray, axis: int, weight: Any, bias: Any, eps: float,
                    running_mean: Any, running_var: Any, momentum: float,
                    residual: np.ndarray | None = None, relu: bool = False,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple]:
    """Normalize with batch statistics; update the running ones in place (after everything else).

    Returns ``y``, the float64 batch mean, ``save_mean``/``save_invstd`` in the stat dtype, and
    the apply coefficients (for a fused activation's backward).
    """
    count, mean, m2 = stats(x, axis)
    var = m2 / count
    invstd = 1.0 / np.sqrt(var + eps)
    coef = forward_coefficients(mean, invstd, weight, bias, x.dtype)
    y = apply(x, axis, *coef, residual, relu)
    if running_mean is not None:
        unbiased = var * (count / (count - 1))
        new_mean = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
        new_var = (1.0 - momentum) * running_var.astype(np.float64) + momentum * unbiased
        running_mean[...] = new_mean
        running_var[...] = new_var
    return (y, mean, *_saved(x, mean, invstd), coef)


def normalize_eval(x: np.ndarray, axis: int, running_mean: np.ndarray, running_var: np.ndarray,
                   weight: Any, bias: Any, eps: float, residual: np.ndarray | None = None,
                   relu: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple]:
    """Normalize with the running statistics; same returns as :func:`normalize_train`."""
    mean = running_mean.astype(np.float64)
    invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    coef = forward_coefficients(mean, invstd, weight, bias, x.dtype)
    y = apply(x, axis, *coef, residual, relu)
    return (y, mean, *_saved(x, mean, invstd), coef)


def relu_grad(dy: np.ndarray, x: np.ndarray, axis: int, coef: tuple,
              residual: np.ndarray | None) -> np.ndarray:
    """``dy`` where the fused forward's output (recomputed, in ``x.dtype``) was > 0, else 0."""
    center, scale, shift = coef
    pre = apply(x, axis, center, scale, shift, residual)
    return np.where(pre > 0, dy, np.zeros((), dy.dtype)).astype(x.dtype, copy=False)


def apply(x: np.ndarray, axis: int, center: np.ndarray, scale: np.ndarray, shift: np.ndarray,
          residual: np.ndarray | None = None, relu: bool = False) -> np.ndarray:
    """``act((x - center) * scale + shift + residual)`` per channel, in the compute dtype, output
    in ``x.dtype``; act is ReLU (NaN kept) when ``relu``, residual optional.

    When every ``|center * scale|`` is small the same value is computed in two passes as
    ``x * scale + (shift - center * scale)``: rounding then grows by at most ``_FOLD_LIMIT`` ulps
    of the output. Large means (and constant channels) keep the exact three-pass form.
    """
    x3 = view3(x, axis)
    y = np.empty(x.shape, x.dtype)
    y3 = y.reshape(x3.shape)
    cd = compute_dtype(x.dtype)
    center = center.astype(cd)
    folded = bool(np.all(np.abs(center * scale) <= _FOLD_LIMIT))
    if folded:
        shift = shift - center.astype(np.float64) * scale
    center, scale, shift = (_per_channel(v, x3, cd) for v in (center, scale, shift))
    z3 = None if residual is None else view3(residual, axis)

    def run(tile: Tile) -> None:
        out, xs, chans = _part(y3, tile), _part(x3, tile), tile[1]
        tmp = out if out.dtype == cd else np.empty(out.shape, cd)
        if folded:
            np.multiply(xs, scale[chans], out=tmp, dtype=cd)
        else:
            np.subtract(xs, center[chans], out=tmp, dtype=cd)
            tmp *= scale[chans]
        tmp += shift[chans]
        if z3 is not None:
            np.add(tmp, _part(z3, tile), out=tmp, dtype=cd)
        if relu:
            np.maximum(tmp, 0, out=tmp)
        if tmp is not out:
            out[...] = tmp

    _map(run, _tiles(x3.shape), x.size)
    return y


def backward_reduce(dy: np.ndarray, x: np.ndarray, axis: int, center: np.ndarray,
                    centred: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float64 ``sum(dy)`` and ``sum(dy * (x - center))``.

    With ``centred`` (every ``|center|`` within one deviation of zero) the second sum is taken as
    ``sum(dy * x) - center * sum(dy)``, which then cancels less than a bit, without a temporary.
    """
    x3, dy3 = view3(x, axis), view3(dy, axis)
    c = x3.shape[1]
    cd = compute_dtype(x.dtype)
    center_t = center.astype(cd)[:, None]

    def run(tile: Tile) -> tuple[np.ndarray, np.ndarray]:
        g = _block(dy3, tile)
        if g.dtype != cd:
            g = g.astype(cd)
        xs = _block(x3, tile)
        if centred and xs.dtype == cd:
            return _channel_sum(g), _channel_sum(xs, g)
        e = np.subtract(xs, center_t[tile[1]], dtype=cd)
        return _channel_sum(g), _channel_sum(e, g)

    sum_dy, sum_dy_xc = np.zeros(c), np.zeros(c)
    tiles = _tiles(x3.shape)
    for tile, (s, p) in zip(tiles, _map(run, tiles, x.size), strict=True):  # tile order
        sum_dy[tile[1]] += s
        sum_dy_xc[tile[1]] += p
    if centred and x.dtype == cd:
        sum_dy_xc -= center.astype(np.float64) * sum_dy
    return sum_dy, sum_dy_xc


def backward_apply(dy: np.ndarray, x: np.ndarray, axis: int, center: np.ndarray, a: np.ndarray,
                   b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``a * dy + b * (x - center) + c`` per channel, output in ``x.dtype``.

    Folded to ``a * dy + b * x + (c - b * center)`` when every ``|b * center|`` is small next to
    ``|a|`` (the same rule as :func:`apply`).
    """
    x3, dy3 = view3(x, axis), view3(dy, axis)
    dx = np.empty(x.shape, x.dtype)
    dx3 = dx.reshape(x3.shape)
    cd = compute_dtype(x.dtype)
    center = center.astype(cd)
    folded = bool(np.all(np.abs(b * center) <= _FOLD_LIMIT * np.abs(a)))
    if folded:
        c = c - b * center.astype(np.float64)
    center, a, b, c = (_per_channel(v, x3, cd) for v in (center, a, b, c))

    def run(tile: Tile) -> None:
        out, chans = _part(dx3, tile), tile[1]
        tmp = out if out.dtype == cd else np.empty(out.shape, cd)
        xs, g = _part(x3, tile), _part(dy3, tile)
        if folded:
            np.multiply(xs, b[chans], out=tmp, dtype=cd)
        else:
            np.subtract(xs, center[chans], out=tmp, dtype=cd)
            tmp *= b[chans]
        tmp += c[chans]
        tmp += np.multiply(g, a[chans], dtype=cd)
        if tmp is not out:
            out[...] = tmp

    _map(run, _tiles(x3.shape), x.size)
    return dx


def backward_sums(dy: np.ndarray, x: np.ndarray, axis: int, mean: np.ndarray,
                 invstd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float64 ``sum(dy)`` and ``sum(dy * (x - mean))``."""
    mean = mean.astype(np.float64)
    center = mean.astype(compute_dtype(x.dtype))
    centred = bool(np.all(np.abs(mean) * invstd.astype(np.float64) <= 1.0))
    sum_dy, sum_dy_xc = backward_reduce(dy, x, axis, center, centred)
    return sum_dy, sum_dy_xc - (mean - center) * sum_dy


def backward(dy: np.ndarray, x: np.ndarray, axis: int, weight: Any, mean: np.ndarray,
             invstd: np.ndarray, training: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``grad_input`` (``x.dtype``), float64 ``grad_weight`` and ``grad_bias``."""
    count = x.size // x.shape[axis] if x.shape[axis] else 0
    sum_dy, sum_dy_xmu = backward_sums(dy, x, axis, mean, invstd)
    center, a, b, c, grad_weight, grad_bias = backward_coefficients(
        mean, invstd, weight, sum_dy, sum_dy_xmu, count, training, x.dtype)
    return backward_apply(dy, x, axis, center, a, b, c), grad_weight, grad_bias


def normalize_with(x: np.ndarray, axis: int, mean: np.ndarray, invstd: np.ndarray, weight: Any,
                   bias: Any, residual: np.ndarray | None = None, relu: bool = False,
                   ) -> tuple[np.ndarray, tuple]:
    """Apply given (e.g. globally merged) statistics; returns ``y`` and the coefficients."""
    coef = forward_coefficients(mean, invstd, weight, bias, x.dtype)
    return apply(x, axis, *coef, residual, relu), coef


# The normalizations over groups (LayerNorm, GroupNorm, InstanceNorm).
from .numpy_groups import group_backward, group_forward  # noqa: E402, F401

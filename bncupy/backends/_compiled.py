"""The NumPy backend's passes compiled with Numba (used when Numba is importable).

Each function handles a range ``[lo, hi)`` of work units and writes only its own units' outputs,
so the backend can hand ranges to its threads and merge partials in unit order (results do not
depend on the thread count). Two layouts of a contiguous ``(A, C, B)`` array:

* rows (channel first, rows long enough to vectorize): ``x2`` is ``(A*C, B)``; a unit is a
  segment of at most ``seg`` values of one row, so it belongs to channel ``row % C``;
* columns (channels last, or short rows): ``x2`` is ``(A, C*B)``; a unit is a block of ``rows``
  rows, and per-column vectors (a channel's values spread over its ``B`` columns) run along the
  contiguous axis.

Statistics of a unit are centred sums, ``sum(x - centre)`` and ``sum((x - centre)^2)``
accumulated in float64 (column blocks add eight rows in the compute dtype first). A row
segment's centre is its mean (a first pass while it is in cache); a column block's is the mean
of its first 16 rows, and where that is more than a standard deviation from the block's mean in
some channel (sorted or trending data) the block, still in cache, is summed again about its
mean. Elementwise passes compute in the compute dtype exactly as the pure-NumPy passes do,
operation for operation, so the two give bitwise-equal outputs. float16 arrays come in as
``uint16`` views and are widened per value with the CPU's half-precision conversion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_SUMS = {"reassoc"}  # lets LLVM vectorize float64 sums; the order is still fixed by the code
NUMBA_VERSION = numba.__version__


def _kernel(**options: Any) -> Callable[[Callable], Any]:
    """``njit(nogil=True, cache=True, **options)``: compiled code is cached on disk (next to this
    file, else in the user's cache directory, or in ``NUMBA_CACHE_DIR``), so that only the first
    process pays for compiling. Where none of those is writable, the loops are compiled without
    the cache, once in every process."""
    def wrap(fn: Callable) -> Any:
        try:
            return njit(nogil=True, cache=True, **options)(fn)
        except RuntimeError:  # Numba: "cannot cache function ...: no locator available"
            return njit(nogil=True, **options)(fn)
    return wrap


@intrinsic
def _half_to_float(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _float_to_half(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _prefetch(typingctx, flat, index):
    """Ask for the cache line holding ``flat[index]`` into L2 (x86 ``prefetcht1``; never
    faults)."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        byte = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [byte, ir.IntType(32), ir.IntType(32),
                                               ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        i32 = ir.IntType(32)  # read, locality 2 (into L2, as the hardware prefetcher would), data
        builder.call(fn, [builder.bitcast(builder.gep(data, [args[1]]), byte), i32(0), i32(2),
                          i32(1)])
        return context.get_dummy_value()

    return types.void(flat, types.intp), codegen


@njit(inline="always")
def _prefetch_rows(xf, start, stop):
    """Prefetch ``xf[start:stop]`` (clipped to ``xf``), one request per 64-byte line."""
    step = 64 // xf.itemsize
    for i in range(start, min(stop, xf.shape[0]), step):
        _prefetch(xf, i)


def widen(value):  # pragma: no cover - replaced by the overload inside compiled code
    """A stored value in its compute dtype (float16 bits -> float32)."""


@overload(widen)
def _widen(value):
    if value == types.uint16:
        return lambda value: _half_to_float(value)
    return lambda value: value


def narrow(out, value):  # pragma: no cover - replaced by the overload inside compiled code
    """``value`` as stored in ``out`` (float32 -> float16 bits, round to nearest even)."""


@overload(narrow)
def _narrow(out, value):
    if out.dtype == types.uint16:
        return lambda out, value: _float_to_half(np.float32(value))
    return lambda out, value: value


def compute(like, value):  # pragma: no cover - replaced by the overload inside compiled code
    """``value`` in the compute dtype of the array ``like`` (float32, or float64 for float64)."""


@overload(compute)
def _compute(like, value):
    if like.dtype == types.float64:
        return lambda like, value: np.float64(value)
    return lambda like, value: np.float32(value)


@_kernel(fastmath=_SUMS)
def row_moments(x2, seg, lo, hi, mean, m2):
    """Two-pass mean and M2 of each row segment ``u`` in ``[lo, hi)``."""
    nseg = (x2.shape[1] + seg - 1) // seg
    for u in range(lo, hi):
        xs = x2[u // nseg, (u % nseg) * seg:(u % nseg + 1) * seg]
        n = xs.shape[0]
        s = 0.0
        for j in range(n):
            s += widen(xs[j])
        centre = compute(x2, s / n)
        s1 = s2 = 0.0
        for j in range(n):
            d = widen(xs[j]) - centre
            s1 += d
            s2 += np.float64(d) * d
        mean[u] = centre + s1 / n
        m2[u] = s2 - s1 * s1 / n


def compute_empty(like, n):  # pragma: no cover - replaced by the overload inside compiled code
    """An uninitialised ``(n,)`` array of the compute dtype of the array ``like``."""


@overload(compute_empty)
def _compute_empty(like, n):
    if like.dtype == types.float64:
        return lambda like, n: np.empty(n, np.float64)
    return lambda like, n: np.empty(n, np.float32)


@njit(inline="always")
def _sum8(v0, v1, v2, v3, v4, v5, v6, v7):
    return ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7))


# The column kernels below add eight rows in the compute dtype into a per-channel vector, then
# that vector into the float64 accumulators in a loop of its own: in one loop, the float64
# accumulators would hold LLVM to four-lane float32 vectors.

@_kernel()
def column_moments(x2, rows, lo, hi, mean, m2):
    """Per-channel mean and M2 of each block ``u`` of ``rows`` rows, about a centre: the mean
    of the block's first 16 rows, or (where that is more than a standard deviation from the
    block's mean in some channel, which costs the sums ``1 + (mean - centre)^2 / var`` times
    their rounding) the block's mean, in a second pass over the block in cache.

    Eight rows at a time are summed in the compute dtype (at most 8 ulps) and added to float64
    accumulators, which are so loaded and stored once per eight values. On float16 (twice
    the arithmetic per byte) the pass prefetches the next block, so that its reading from
    memory overlaps the arithmetic.
    """
    a, c = x2.shape
    s1 = np.empty(c, np.float64)
    s2 = np.empty(c, np.float64)
    centre = compute_empty(x2, c)
    for u in range(lo, hi):
        r0, r1 = u * rows, min((u + 1) * rows, a)
        n = r1 - r0
        s1[:] = 0.0
        for r in range(r0, min(r1, r0 + 16)):
            xr = x2[r]
            for k in range(c):
                s1[k] += widen(xr[k])
        for k in range(c):
            centre[k] = compute(x2, s1[k] / min(n, 16))
        _centred_sums(x2, r0, r1, u + 1 < hi, centre, s1, s2)
        far = False
        for k in range(c):
            if s1[k] * s1[k] > s2[k] * (n / 2):  # (mean - centre)^2 > var; NaN: False
                centre[k] = compute(x2, centre[k] + s1[k] / n)
                far = True
        if far:
            _centred_sums(x2, r0, r1, False, centre, s1, s2)
        for k in range(c):
            mean[u, k] = centre[k] + s1[k] / n
            m2[u, k] = s2[k] - s1[k] * s1[k] / n


@njit(inline="always")
def _centred_sums(x2, r0, r1, prefetch, centre, s1, s2):
    """float64 ``s1 = sum(x - centre)``, ``s2 = sum((x - centre)^2)`` per channel over rows
    ``[r0, r1)``; with ``prefetch``, float16 rows ``[r1, 2 * r1 - r0)`` are asked into cache
    meanwhile (float32: measured no faster)."""
    c = x2.shape[1]
    xf = x2.reshape(-1)
    n = r1 - r0
    r8 = r0 + n - n % 8
    t1 = compute_empty(x2, c)
    t2 = compute_empty(x2, c)
    s1[:] = 0.0
    s2[:] = 0.0
    for r in range(r0, r8, 8):
        if x2.itemsize == 2 and prefetch:
            _prefetch_rows(xf, (r + n) * c, (r + n + 8) * c)
        x0, x1, x2_, x3, x4, x5, x6, x7 = (x2[r], x2[r + 1], x2[r + 2], x2[r + 3], x2[r + 4],
                                           x2[r + 5], x2[r + 6], x2[r + 7])
        for k in range(c):
            m = centre[k]
            d0, d1, d2, d3 = widen(x0[k]) - m, widen(x1[k]) - m, widen(x2_[k]) - m, widen(x3[k]) - m
            d4, d5, d6, d7 = widen(x4[k]) - m, widen(x5[k]) - m, widen(x6[k]) - m, widen(x7[k]) - m
            t1[k] = _sum8(d0, d1, d2, d3, d4, d5, d6, d7)
            t2[k] = _sum8(d0 * d0, d1 * d1, d2 * d2, d3 * d3, d4 * d4, d5 * d5, d6 * d6, d7 * d7)
        for k in range(c):
            s1[k] += np.float64(t1[k])
            s2[k] += np.float64(t2[k])
    for r in range(r8, r1):
        xr = x2[r]
        for k in range(c):
            d = np.float64(widen(xr[k]) - centre[k])
            s1[k] += d
            s2[k] += d * d


@_kernel()
def merge_moments(mean, m2, counts):
    """Chan et al. merge of partials ``(P, C)`` over ``P``, in order; returns float64 (C,)."""
    p, c = mean.shape
    n = np.zeros(c, np.float64)
    out_mean = np.zeros(c, np.float64)
    out_m2 = np.zeros(c, np.float64)
    for i in range(p):
        nb = np.float64(counts[i])
        if nb == 0:
            continue
        for k in range(c):
            total = n[k] + nb
            delta = mean[i, k] - out_mean[k]
            w = nb / total
            out_mean[k] += delta * w
            out_m2[k] += m2[i, k] + delta * delta * n[k] * w
            n[k] = total
    return out_mean, out_m2


@_kernel()
def row_affine(x2, z2, y2, seg, channels, center, scale, shift, relu, lo, hi):
    """``y = act((x - center) * scale + shift + z)`` on row segments; ``z2`` may be None."""
    nseg = (x2.shape[1] + seg - 1) // seg
    zero = compute(x2, 0.0)
    for u in range(lo, hi):
        r, j0 = u // nseg, (u % nseg) * seg
        k = r % channels
        m, s, t = center[k], scale[k], shift[k]
        xs, ys = x2[r, j0:j0 + seg], y2[r, j0:j0 + seg]
        if z2 is None:
            for j in range(xs.shape[0]):
                v = (widen(xs[j]) - m) * s + t
                if relu and v < 0:
                    v = zero
                ys[j] = narrow(ys, v)
        else:
            zs = z2[r, j0:j0 + seg]
            for j in range(xs.shape[0]):
                v = (widen(xs[j]) - m) * s + t + widen(zs[j])
                if relu and v < 0:
                    v = zero
                ys[j] = narrow(ys, v)


@_kernel()
def column_affine(x2, z2, y2, rows, center, scale, shift, relu, lo, hi):
    """``y = act((x - center) * scale + shift + z)`` on row blocks; ``z2`` may be None."""
    c = x2.shape[1]
    xf, yf = x2.reshape(-1), y2.reshape(-1)
    zf = None if z2 is None else z2.reshape(-1)
    zero = compute(x2, 0.0)
    for r in range(lo * rows, min(hi * rows, x2.shape[0])):
        base = np.uint64(r * c)  # unsigned: no negative-index wraparound, so the loop vectorizes
        for k in range(c):
            i = base + np.uint64(k)
            v = (widen(xf[i]) - center[k]) * scale[k] + shift[k]
            if zf is not None:
                v = v + widen(zf[i])
            if relu and v < 0:
                v = zero
            yf[i] = narrow(yf, v)


@_kernel(fastmath=_SUMS)
def row_grad_sums(g2, x2, seg, channels, center, lo, hi, sum_g, sum_gx):
    """Per row segment float64 ``sum(g)`` and ``sum(g * (x - center))``."""
    nseg = (x2.shape[1] + seg - 1) // seg
    for u in range(lo, hi):
        r, j0 = u // nseg, (u % nseg) * seg
        m = center[r % channels]
        gs, xs = g2[r, j0:j0 + seg], x2[r, j0:j0 + seg]
        s = p = 0.0
        for j in range(xs.shape[0]):
            g = np.float64(widen(gs[j]))
            s += g
            p += g * (widen(xs[j]) - m)
        sum_g[u] = s
        sum_gx[u] = p


@_kernel()
def column_grad_sums(g2, x2, rows, center, lo, hi, sum_g, sum_gx):
    """Per block of rows, per channel float64 ``sum(g)`` and ``sum(g * (x - center))``; eight
    rows at a time in the compute dtype, as in :func:`column_moments`."""
    a, c = x2.shape
    t1 = compute_empty(x2, c)
    t2 = compute_empty(x2, c)
    for u in range(lo, hi):
        s, p = sum_g[u], sum_gx[u]
        s[:] = 0.0
        p[:] = 0.0
        r0, r1 = u * rows, min((u + 1) * rows, a)
        r8 = r0 + (r1 - r0) - (r1 - r0) % 8
        for r in range(r0, r8, 8):
            g0, g1, g2_, g3, g4, g5, g6, g7 = (g2[r], g2[r + 1], g2[r + 2], g2[r + 3], g2[r + 4],
                                               g2[r + 5], g2[r + 6], g2[r + 7])
            x0, x1, x2_, x3, x4, x5, x6, x7 = (x2[r], x2[r + 1], x2[r + 2], x2[r + 3], x2[r + 4],
                                               x2[r + 5], x2[r + 6], x2[r + 7])
            for k in range(c):
                m = center[k]
                h0, h1, h2, h3 = widen(g0[k]), widen(g1[k]), widen(g2_[k]), widen(g3[k])
                h4, h5, h6, h7 = widen(g4[k]), widen(g5[k]), widen(g6[k]), widen(g7[k])
                t1[k] = _sum8(h0, h1, h2, h3, h4, h5, h6, h7)
                t2[k] = _sum8(h0 * (widen(x0[k]) - m), h1 * (widen(x1[k]) - m),
                              h2 * (widen(x2_[k]) - m), h3 * (widen(x3[k]) - m),
                              h4 * (widen(x4[k]) - m), h5 * (widen(x5[k]) - m),
                              h6 * (widen(x6[k]) - m), h7 * (widen(x7[k]) - m))
            for k in range(c):
                s[k] += np.float64(t1[k])
                p[k] += np.float64(t2[k])
        for r in range(r8, r1):
            gr, xr = g2[r], x2[r]
            for k in range(c):
                g = np.float64(widen(gr[k]))
                s[k] += g
                p[k] += g * (widen(xr[k]) - center[k])


@_kernel()
def row_grad_affine(g2, x2, dx2, seg, channels, center, a, b, c, lo, hi):
    """``dx = (x - center) * b + c + g * a`` on row segments."""
    nseg = (x2.shape[1] + seg - 1) // seg
    for u in range(lo, hi):
        r, j0 = u // nseg, (u % nseg) * seg
        k = r % channels
        m, ak, bk, ck = center[k], a[k], b[k], c[k]
        gs, xs, ds = g2[r, j0:j0 + seg], x2[r, j0:j0 + seg], dx2[r, j0:j0 + seg]
        for j in range(xs.shape[0]):
            ds[j] = narrow(ds, (widen(xs[j]) - m) * bk + ck + widen(gs[j]) * ak)


@_kernel()
def column_grad_affine(g2, x2, dx2, rows, center, a, b, c, lo, hi):
    """``dx = (x - center) * b + c + g * a`` on row blocks."""
    ch = x2.shape[1]
    gf, xf, df = g2.reshape(-1), x2.reshape(-1), dx2.reshape(-1)
    for r in range(lo * rows, min(hi * rows, x2.shape[0])):
        base = np.uint64(r * ch)
        for k in range(ch):
            i = base + np.uint64(k)
            df[i] = narrow(df, (widen(xf[i]) - center[k]) * b[k] + c[k] + widen(gf[i]) * a[k])


# --- small tensors: a whole op in one call (float32/float64 arrays; see numpy.py, SMALL) ---------

SMALL_WEIGHT, SMALL_BIAS, SMALL_RUNNING, SMALL_RESIDUAL, SMALL_RELU, SMALL_TRAIN = (
    1, 2, 4, 8, 16, 32)  # small_forward's flags


@njit(inline="always")
def _coefficients(like, mean, var, eps, w, b, k, flags):
    """Channel ``k``'s ``invstd`` and ``forward_coefficients`` (float64 ``mean`` and ``var``;
    ``center`` in the compute dtype of ``like``), the same operations as the Python code's."""
    invstd = 1.0 / np.sqrt(var + eps)
    ck = compute(like, mean)
    scale = invstd * np.float64(w[k]) if flags & SMALL_WEIGHT else invstd
    shift = -(mean - np.float64(ck)) * scale
    if flags & SMALL_BIAS:
        shift = shift + np.float64(b[k])
    return invstd, ck, scale, shift


@njit(inline="always")
def _update_running(rm, rv, k, mean, var, n, momentum):
    """The running statistics' update of channel ``k``, as ``normalize_train`` makes it."""
    unbiased = var * (n / (n - 1))
    rm[k] = (1.0 - momentum) * np.float64(rm[k]) + momentum * mean
    rv[k] = (1.0 - momentum) * np.float64(rv[k]) + momentum * unbiased


@_kernel()
def small_forward(x3, z3, y3, w, b, rm, rv, flags, eps, momentum, stats, center):
    """Batch-norm forward of a small ``(A, C, B)`` array: per channel the float64 two-pass
    statistics (training) or the running ones, the coefficients of ``forward_coefficients``,
    ``y = act((x - center) * scale + shift + z)`` in the compute dtype, and (training with
    running statistics) their update. Writes ``stats`` rows mean, invstd, scale, shift and the
    compute-dtype ``center``. Absent arrays are placeholders (``flags`` says which are given).
    """
    a, c, n_b = x3.shape
    n = a * n_b
    zero = compute(x3, 0.0)
    for k in range(c):
        if flags & SMALL_TRAIN:  # two passes about a centre in the compute dtype, as stats()
            s = 0.0
            for i in range(a):
                for j in range(n_b):
                    s += np.float64(x3[i, k, j])
            centre = np.float64(compute(x3, s / n))
            s1 = 0.0
            s2 = 0.0
            for i in range(a):
                for j in range(n_b):
                    d = np.float64(x3[i, k, j]) - centre
                    s1 += d
                    s2 += d * d
            mean = centre + s1 / n
            m2 = s2 - s1 * s1 / n
            if m2 < 0.0:
                m2 = 0.0
            var = m2 / n
        else:
            mean = np.float64(rm[k])
            var = np.float64(rv[k])
        invstd, ck, scale, shift = _coefficients(x3, mean, var, eps, w, b, k, flags)
        sc, sh = compute(x3, scale), compute(x3, shift)
        for i in range(a):
            for j in range(n_b):
                v = (x3[i, k, j] - ck) * sc + sh
                if flags & SMALL_RESIDUAL:
                    v = v + compute(x3, z3[i, k, j])
                if flags & SMALL_RELU and v < 0:
                    v = zero
                y3[i, k, j] = v
        stats[0, k], stats[1, k], stats[2, k], stats[3, k] = mean, invstd, scale, shift
        center[k] = ck
        if flags & SMALL_TRAIN and flags & SMALL_RUNNING:
            _update_running(rm, rv, k, mean, var, n, momentum)


@_kernel()
def fused_forward(x2, y2, by_rows, length, units, counts, parts, c, w, b, rm, rv, flags, eps,
                  momentum, stats, center):
    """A whole batch-norm forward in one call, for arrays too small to share among threads:
    the passes of :class:`CompiledPasses` (``moments``: ``row_moments`` or ``column_moments``
    and ``merge_moments`` in the same order, then ``affine``) and the Python code's per-channel
    arithmetic between them, so the results are bitwise those of the separate calls. ``x2``,
    ``y2``: the ``_flat`` views; ``parts``: partials per channel and row or block; ``flags``
    as :func:`small_forward`'s (no residual); ``stats`` and ``center`` as there."""
    n = x2.size // c
    means = m2s = np.zeros(c)
    if flags & SMALL_TRAIN:
        if by_rows:
            um, uq = np.empty(units), np.empty(units)
            row_moments(x2, length, 0, units, um, uq)
        else:
            um2, uq2 = np.empty((units, c * parts)), np.empty((units, c * parts))
            column_moments(x2, length, 0, units, um2, uq2)
            um, uq = um2.reshape(-1), uq2.reshape(-1)
        if parts == 1:  # already (row or block, channel)
            pm, pq = um.reshape(-1, c), uq.reshape(-1, c)
        else:
            pm, pq = np.empty((counts.shape[0], c)), np.empty((counts.shape[0], c))
            u = 0  # (row or block, channel, part) -> (row or block, part): no integer divisions
            for i in range(0, counts.shape[0], parts):
                for ch in range(c):
                    for j in range(i, i + parts):
                        pm[j, ch], pq[j, ch] = um[u], uq[u]
                        u += 1
        means, m2s = merge_moments(pm, pq, counts)
    cen = compute_empty(x2, c)
    scale = compute_empty(x2, c)
    shift = compute_empty(x2, c)
    for k in range(c):
        if flags & SMALL_TRAIN:
            mean, m2 = means[k], m2s[k]
            if m2 < 0.0:  # np.maximum(m2, 0.0): NaN stays NaN
                m2 = 0.0
            var = m2 / n
        else:
            mean, var = np.float64(rm[k]), np.float64(rv[k])
        invstd, ck, sc, sh = _coefficients(x2, mean, var, eps, w, b, k, flags)
        stats[0, k], stats[1, k], stats[2, k], stats[3, k] = mean, invstd, sc, sh
        center[k] = cen[k] = ck
        scale[k], shift[k] = compute(x2, sc), compute(x2, sh)
        if flags & SMALL_TRAIN and flags & SMALL_RUNNING:
            _update_running(rm, rv, k, mean, var, n, momentum)
    relu = (flags & SMALL_RELU) != 0
    if by_rows:
        row_affine(x2, None, y2, length, c, cen, scale, shift, relu, 0, units)
    else:
        spread = x2.shape[1] // c
        if spread > 1:
            cen, scale, shift = (np.repeat(cen, spread), np.repeat(scale, spread),
                                 np.repeat(shift, spread))
        column_affine(x2, None, y2, length, cen, scale, shift, relu, 0, units)


@njit(inline="always")
def _grad_coefficients(like, m, ck, inv, w, k, flags, n, sum_dy, sum_dy_xc):
    """Channel ``k``'s ``backward_coefficients`` (float64 ``a, b, c``) and ``sum(dy * (x -
    mean))``, from float64 ``mean``, ``invstd`` and the sums about ``ck``, the mean in the
    compute dtype of ``like``; the same operations as the Python code's."""
    residual = m - np.float64(ck)
    sum_dy_xmu = sum_dy_xc - residual * sum_dy
    ka = inv * np.float64(w[k]) if flags & SMALL_WEIGHT else inv
    if flags & SMALL_TRAIN and n > 0:
        kb = -ka * inv * inv * sum_dy_xmu / n
        kc = -ka * sum_dy / n - kb * residual
    else:
        kb = ka * 0.0
        kc = ka * 0.0
    return ka, kb, kc, sum_dy_xmu


@_kernel()
def small_backward(g3, x3, dx3, w, mean, invstd, flags, grads):
    """Batch-norm backward of a small ``(A, C, B)`` array: the float64 sums ``sum(dy)`` and
    ``sum(dy * (x - center))``, ``backward_coefficients``' arithmetic, and
    ``dx = (x - center) * b + c + dy * a`` in the compute dtype; ``grads`` rows: grad_weight,
    grad_bias (float64). ``flags``: SMALL_WEIGHT, SMALL_TRAIN."""
    a_, c, n_b = x3.shape
    n = a_ * n_b
    for k in range(c):
        m = np.float64(mean[k])
        ck = compute(x3, m)
        sum_dy = 0.0
        sum_dy_xc = 0.0
        for i in range(a_):
            for j in range(n_b):
                g = np.float64(g3[i, k, j])
                sum_dy += g
                sum_dy_xc += (np.float64(x3[i, k, j]) - np.float64(ck)) * g
        inv = np.float64(invstd[k])
        ka, kb, kc, sum_dy_xmu = _grad_coefficients(x3, m, ck, inv, w, k, flags, n, sum_dy,
                                                    sum_dy_xc)
        ca, cb, cc = compute(x3, ka), compute(x3, kb), compute(x3, kc)
        for i in range(a_):
            for j in range(n_b):
                v = (x3[i, k, j] - ck) * cb + cc
                dx3[i, k, j] = v + compute(x3, g3[i, k, j]) * ca
        grads[0, k] = sum_dy_xmu * inv
        grads[1, k] = sum_dy


@_kernel()
def fused_backward(g2, x2, dx2, by_rows, length, units, c, w, mean, invstd, flags, grads):
    """A whole batch-norm backward in one call, for arrays too small to share among threads and
    with one partial per channel and row or block (rows of at most one segment, or ``B == 1``):
    ``row_grad_sums`` or ``column_grad_sums``, their partials added in order, the per-channel
    arithmetic of ``backward_coefficients``, then ``row_grad_affine`` or ``column_grad_affine``,
    bitwise the results of the separate calls. ``g2``, ``x2``, ``dx2``: the ``_flat`` views;
    ``flags``, ``grads`` as :func:`small_backward`'s."""
    n = x2.size // c
    cen = compute_empty(x2, c)
    for k in range(c):
        cen[k] = compute(x2, np.float64(mean[k]))
    if by_rows:
        sg, sgx = np.empty(units), np.empty(units)
        row_grad_sums(g2, x2, length, c, cen, 0, units, sg, sgx)
    else:
        sg2, sgx2 = np.empty((units, c)), np.empty((units, c))
        column_grad_sums(g2, x2, length, cen, 0, units, sg2, sgx2)
        sg, sgx = sg2.reshape(-1), sgx2.reshape(-1)
    ka = compute_empty(x2, c)
    kb = compute_empty(x2, c)
    kc = compute_empty(x2, c)
    for k in range(c):
        sum_dy, sum_dy_xc = sg[k], sgx[k]
        for i in range(k + c, sg.shape[0], c):  # as NumPy adds the (partial, channel) rows
            sum_dy += sg[i]
            sum_dy_xc += sgx[i]
        m, inv = np.float64(mean[k]), np.float64(invstd[k])
        a_, b_, c_, sum_dy_xmu = _grad_coefficients(x2, m, cen[k], inv, w, k, flags, n, sum_dy,
                                                    sum_dy_xc)
        ka[k], kb[k], kc[k] = compute(x2, a_), compute(x2, b_), compute(x2, c_)
        grads[0, k] = sum_dy_xmu * inv
        grads[1, k] = sum_dy
    if by_rows:
        row_grad_affine(g2, x2, dx2, length, c, cen, ka, kb, kc, 0, units)
    else:
        column_grad_affine(g2, x2, dx2, length, cen, ka, kb, kc, 0, units)


SMALL_RMS = 64  # small_rows' flag (with SMALL_WEIGHT, SMALL_BIAS)


@_kernel()
def small_rows(x2, y2, w, b, flags, eps, mean, invstd):
    """LayerNorm (RMSNorm with ``SMALL_RMS``: about 0) of each row of a small ``(rows, C)``
    array in one call, as ``numpy_groups.group_forward``: float64 moments of ``x`` minus the
    row's first value (a constant row gives exactly ``bias``), ``y`` rounded once. Writes the
    float64 per-row ``mean`` and ``invstd``. ``flags``: SMALL_WEIGHT, SMALL_BIAS, SMALL_RMS."""
    n, c = x2.shape
    rms = flags & SMALL_RMS
    for i in range(n):
        pilot = 0.0 if rms else np.float64(x2[i, 0])
        offset = 0.0
        if not rms:
            s = 0.0
            for j in range(c):
                s += np.float64(x2[i, j]) - pilot
            offset = s / c
        q = 0.0
        for j in range(c):
            d = (np.float64(x2[i, j]) - pilot) - offset
            q += d * d
        inv = 1.0 / np.sqrt(q / c + eps)
        for j in range(c):
            scale = inv * np.float64(w[j]) if flags & SMALL_WEIGHT else inv
            v = ((np.float64(x2[i, j]) - pilot) - offset) * scale
            if flags & SMALL_BIAS:
                v += np.float64(b[j])
            y2[i, j] = v
        mean[i] = pilot + offset
        invstd[i] = inv


def cache_dir() -> str | None:
    """The directory the compiled loops are cached in, or None when they are not cached."""
    return getattr(row_moments._cache, "cache_path", None)

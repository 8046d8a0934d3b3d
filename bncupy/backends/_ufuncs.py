"""The NumPy backend's pure-NumPy engine: its passes as NumPy ufunc calls on cache-sized tiles.

It runs where Numba is not installed and is the second reference for the compiled engine: its
elementwise outputs are bitwise equal to the compiled loops', its statistics differ only in
rounding (the order of the sums and the centres). A C-contiguous ``(A, C, B)`` array is walked
in one of two layouts, so that ufunc loops run over long contiguous stretches:

* rows (channel first: ``B >= ROW_MIN_SUMS`` for the passes that sum, ``B >= ROW_MIN`` for the
  elementwise ones): tiles of whole rows of ``B`` values (very long rows in segments),
  per-channel scalars broadcast along the rows; a row is summed pairwise by NumPy;
* periods (channels last, short rows): the flat array repeats its channel pattern every
  ``P = C * B`` values. It is viewed as rows of ``k`` periods, ``k * P >= PERIOD_MIN`` (the
  ``A % k`` planes left over as rows of one period), per-channel vectors are spread over such a
  row, and columns are summed 16 rows at a time.

A tile's statistics are taken while it is in cache: a centre (the mean of every 16th value of
each row, or of every 16th row of periods, rounded to the compute dtype), then ``sum(x - centre)``
and ``sum((x - centre)^2)``; partial sums of at most 16 values (or of a row, pairwise) in the
compute dtype are added in float64, and the tiles' partials are Chan-merged in tile order. The
centred sums lose ``1 + (mean - centre)^2 / var`` times the rounding of centred data: where that
exceeds 2 in some channel (a sample far from its tile's mean: sorted or trending data), the tile
is summed again about its mean. float16 is widened to float32 a tile at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from ._common import compute_dtype, merge
from ._pool import run

TILE_ELEMENTS = 1 << 17  # 512 KiB of float32: a tile and its temporaries stay in L2
ROW_MIN_SUMS = 128  # shortest row summed as a row (pairwise, in one ufunc loop)
ROW_MIN = 512  # shortest row an elementwise pass walks as a row
PERIOD_MIN = 8192  # shortest row of periods: ufunc loops broadcasting a vector are slow below it
SHORT_BUFFER = 64  # ufunc buffer (elements) of the passes that broadcast vectors over rows

Tile = tuple[slice, slice, slice]  # rows layout: rows of A, channels, columns of B


def _tiles(shape: tuple[int, int, int]) -> list[Tile]:
    """Contiguous blocks of about ``TILE_ELEMENTS`` of an ``(A, C, B)`` array, in a fixed order:
    whole ``(C, B)`` planes when they are small, else channel runs of one row, else (very long
    rows) column runs of one channel."""
    a, c, b = shape
    if a == 0 or b == 0 or c == 0:
        return []
    every = slice(None)
    if c * b <= TILE_ELEMENTS:
        step = TILE_ELEMENTS // (c * b)
        return [(slice(i, min(i + step, a)), every, every) for i in range(0, a, step)]
    if b <= TILE_ELEMENTS:
        step = max(1, TILE_ELEMENTS // b)
        return [(slice(i, i + 1), slice(j, min(j + step, c)), every)
                for i in range(a) for j in range(0, c, step)]
    return [(slice(i, i + 1), slice(j, j + 1), slice(k, min(k + TILE_ELEMENTS, b)))
            for i in range(a) for j in range(c) for k in range(0, b, TILE_ELEMENTS)]


def _rows_f64(a: np.ndarray) -> np.ndarray:
    """The float64 sum of the rows of a 2-D array (cast first: NumPy's reductions with
    ``dtype=`` cast slowly)."""
    a = a.astype(np.float64)
    return a[0] if a.shape[0] == 1 else a.sum(axis=0)


def column_sums(a: np.ndarray) -> np.ndarray:
    """float64 sums of the columns of a 2-D array, 16 rows at a time in its own dtype."""
    r = a.shape[0] - a.shape[0] % 16
    if r == 0:
        return _rows_f64(a)
    sums = _rows_f64(a[:r].reshape(-1, 16, a.shape[1]).sum(axis=1))
    return sums + _rows_f64(a[r:]) if r < a.shape[0] else sums


class Rows:
    """The rows layout: tiles from :func:`_tiles`, per-channel vectors as columns."""

    short_rows = True  # vectors broadcast over rows of fewer than 8192: see _ShortBuffers
    every_channel = False  # each tile holds every channel (set by _layout)

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.tiles: list[Any] = _tiles(shape)

    @staticmethod
    def prepare(v: np.ndarray) -> np.ndarray:
        return v

    @staticmethod
    def part(a3: np.ndarray, tile: Tile) -> np.ndarray:
        return a3[tile]

    @staticmethod
    def spread(prepared: np.ndarray, tile: Tile) -> np.ndarray:
        return prepared[tile[1], None]

    @staticmethod
    def local(v: np.ndarray, tile: Tile) -> np.ndarray:
        """A vector over the tile's channels, shaped to broadcast against its part."""
        return v[:, None]

    @staticmethod
    def sums(block: np.ndarray, tile: Tile) -> np.ndarray:
        """Per-channel float64 sums of a tile's part."""
        return _rows_f64(block.sum(axis=2))

    @staticmethod
    def sample(block: np.ndarray) -> np.ndarray:
        """Every 16th value of each row: spread over the row (an image's top rows may differ
        from its bottom ones)."""
        return block[:, :, ::16]

    @staticmethod
    def channels(tile: Tile) -> slice:
        return tile[1]

    @staticmethod
    def count(block: np.ndarray, tile: Tile) -> int:
        return block.shape[0] * block.shape[2]


# periods layout tile: (flat start, rows, row length, first column, end column, planes per row)
Span = tuple[int, int, int, int, int, int]


class Periods:
    """The periods layout (module docstring). A tile is whole rows, a multiple of ``group`` of
    them (16 for sums, 1 for elementwise passes); rows of one period longer than a
    ``group``-th of a tile are cut into runs of whole channels."""

    short_rows = False  # rows of PERIOD_MIN values or more
    every_channel = False  # each tile holds every channel (set by _layout)

    def __init__(self, shape: tuple[int, int, int], group: int) -> None:
        a, c, b = shape
        p = c * b
        self.c, self.b, self.group = c, b, group
        self.k = k = max(1, min(a, -(-PERIOD_MIN // p)))
        main = a // k
        self.tiles: list[Any] = (self._spans(0, main, k * p, k)
                                 + self._spans(main * k * p, a - main * k, p, 1))

    def _spans(self, start: int, rows: int, length: int, planes: int) -> list[Span]:
        if rows == 0 or length == 0:
            return []
        g = self.group
        if planes > 1 or g * length <= TILE_ELEMENTS:
            step = max(g, TILE_ELEMENTS // length // g * g)
            return [(start + r * length, min(step, rows - r), length, 0, length, planes)
                    for r in range(0, rows, step)]
        width = max(self.b, TILE_ELEMENTS // g // self.b * self.b)
        return [(start + r * length, min(g, rows - r), length, j, min(j + width, length), 1)
                for r in range(0, rows, g) for j in range(0, length, width)]

    def prepare(self, v: np.ndarray) -> np.ndarray:
        """``v`` spread over a row of ``k`` periods."""
        return self._spread(v, self.k)

    def _spread(self, v: np.ndarray, periods: int) -> np.ndarray:
        out = np.empty((periods, v.shape[0] * self.b), v.dtype)
        out[...] = v if self.b == 1 else np.repeat(v, self.b)  # np.tile: 3x the Python
        return out.reshape(-1)

    @staticmethod
    def part(a3: np.ndarray, tile: Span) -> np.ndarray:
        start, rows, length, j0, j1, _ = tile
        return a3.reshape(-1)[start:start + rows * length].reshape(rows, length)[:, j0:j1]

    @staticmethod
    def spread(prepared: np.ndarray, tile: Span) -> np.ndarray:
        return prepared[tile[3]:tile[4]]

    def local(self, v: np.ndarray, tile: Span) -> np.ndarray:
        return self._spread(v, tile[5])

    def sums(self, block: np.ndarray, tile: Span) -> np.ndarray:
        return column_sums(block).reshape(tile[5], -1, self.b).sum(axis=(0, 2))

    @staticmethod
    def sample(block: np.ndarray) -> np.ndarray:
        """Every 16th row."""
        return block[::16]

    def channels(self, tile: Span) -> slice:
        first = tile[3] // self.b
        return slice(first, first + (tile[4] - tile[3]) // (self.b * tile[5]))

    def count(self, block: np.ndarray, tile: Span) -> int:
        return block.shape[0] * tile[5] * self.b


def layout(shape: tuple[int, int, int], sums: bool) -> Rows | Periods:
    """The layout of the passes that sum (``sums``) or of the elementwise ones over ``shape``;
    vectors spread over a period are not made for fewer than 8 periods (they would outweigh
    the array)."""
    return _layout(shape, sums, TILE_ELEMENTS, ROW_MIN_SUMS, ROW_MIN, PERIOD_MIN)


@functools.lru_cache(maxsize=64)
def _layout(shape: tuple[int, int, int], sums: bool, *limits: int) -> Rows | Periods:
    """:func:`layout`, once per shape and set of the module's limits (the tests change them);
    ``every_channel``: each of its tiles holds every channel."""
    a, c, b = shape
    lay = Rows(shape) if b >= ROW_MIN_SUMS and (sums or b >= ROW_MIN or a < 8) else \
        Periods(shape, 16 if sums else 1)
    lay.every_channel = all(not ch.start and (ch.stop is None or ch.stop >= c)
                            for ch in map(lay.channels, lay.tiles))
    return lay


class _ShortBuffers:
    """In a ``with`` block, NumPy's ufuncs with a buffer shorter than a row, in this thread,
    when ``active`` (the layout's ``short_rows``).

    With the default buffer (8192 elements) a ufunc broadcasting a per-row vector over rows of
    fewer than 8192 values runs about 3x slower than on the same values with a scalar
    (0.34 against 0.11 ns a float32 value on rows of 784, NumPy 2.4); with a buffer shorter than
    a row it runs at 0.12-0.15. Reductions along rows go the other way (0.20 -> 0.23 ns), so only
    the broadcasting operations run under this.
    """

    __slots__ = ("active", "old")

    def __init__(self, active: bool) -> None:
        self.active = active

    def __enter__(self) -> None:
        if self.active:
            self.old = np.setbufsize(SHORT_BUFFER)

    def __exit__(self, *exc: object) -> None:
        if self.active:
            np.setbufsize(self.old)


def _over_tiles(lay: Rows | Periods, fn: Callable[[Any], Any], elements: int,
                broadcasting: bool = False) -> list[Any]:
    """``[fn(tile) for tile in lay.tiles]``, tiles shared out among the threads; with
    ``broadcasting`` (a pass of elementwise operations only) under :class:`_ShortBuffers`, and
    each thread's tiles taken last first: an elementwise pass follows a pass that sums, whose
    last tiles are still in cache."""
    out: list[Any] = [None] * len(lay.tiles)

    def work(lo: int, hi: int) -> None:
        with _ShortBuffers(broadcasting and lay.short_rows):
            for i in range(hi - 1, lo - 1, -1) if broadcasting else range(lo, hi):
                out[i] = fn(lay.tiles[i])

    run(work, len(lay.tiles), elements)
    return out


_MAGIC = np.float32(2.0 ** 112)  # float16 exponent bias 15 -> float32's 127
_SUBNORMAL = np.array([2.0 ** -140], np.float32)


def _widened(a: np.ndarray, cd: np.dtype) -> np.ndarray:
    """A tile in the compute dtype ``cd``; float16 as a float32 copy, exactly.

    NumPy's own float16 conversion branches on every value: on data that mixes zeros with other
    values (post-ReLU) it takes five times as long as on data without zeros. Here the half's bits
    are shifted into a float32's and scaled by ``2**112``, without branches (subnormal halves
    pass through subnormal floats: slower, but exact). Tiles holding inf or NaN, and a CPU set
    to treat subnormals as zero, take NumPy's conversion.
    """
    if a.dtype != np.float16:
        return a.astype(cd, copy=False)
    bits = a.view(np.int16)
    if np.bitwise_and(bits, 0x7FFF).max(initial=0) >= 0x7C00 or (_SUBNORMAL * _MAGIC)[0] == 0:
        return a.astype(cd)
    wide = bits.astype(np.int32)
    wide <<= 13
    wide &= np.int32(-0x70002000)  # 0x8FFFE000: the sign, exponent and mantissa bits
    out = wide.view(np.float32)
    out *= _MAGIC
    return out


def _centred(a: np.ndarray, center: np.ndarray, cd: np.dtype) -> np.ndarray:
    """``a - center`` in ``cd``, in a new array (in the widened copy of a float16 tile)."""
    if a.dtype == cd:
        return np.subtract(a, center)
    wide = _widened(a, cd)
    wide -= center
    return wide


def _affine_tile(out: np.ndarray, xs: np.ndarray, center: np.ndarray, scale: np.ndarray,
                 shift: np.ndarray, cd: np.dtype) -> np.ndarray:
    """``(xs - center) * scale + shift`` in ``cd``: in ``out`` itself when it is of ``cd``, else
    in a temporary that the caller copies into ``out`` when done."""
    if out.dtype == cd:
        tmp = np.subtract(_widened(xs, cd), center, out=out)
    else:
        tmp = _centred(xs, center, cd)
    tmp *= scale
    tmp += shift
    return tmp


class NumpyPasses:
    """The passes as NumPy ufunc calls on one L2-sized tile at a time."""

    name = "numpy"

    @staticmethod
    def moments(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cd = compute_dtype(x3.dtype)
        lay = layout(x3.shape, sums=True)

        def centred_sums(part: np.ndarray, xs: np.ndarray, centre: np.ndarray, tile: Any,
                         ) -> tuple[np.ndarray, np.ndarray]:
            with _ShortBuffers(lay.short_rows):  # a float16 tile's widened copy: in place
                d = np.subtract(xs, lay.local(centre, tile), out=None if xs is part else xs)
            return lay.sums(d, tile), lay.sums(np.square(d, out=d), tile)

        def tile_moments(tile: Any) -> tuple[int, np.ndarray, np.ndarray]:
            part = lay.part(x3, tile)
            xs = _widened(part, cd)  # float16: once per tile
            n = lay.count(xs, tile)
            sample = lay.sample(xs)
            centre = (lay.sums(sample, tile) / lay.count(sample, tile)).astype(cd)
            s1, s2 = centred_sums(part, xs, centre, tile)
            if (s1 * s1 > s2 * (n / 2)).any():  # (mean - centre)^2 > var in some channel
                centre = (centre + s1 / n).astype(cd)
                s1, s2 = centred_sums(part, _widened(part, cd), centre, tile)
            return n, centre + s1 / n, s2 - s1 * s1 / n

        c = x3.shape[1]
        parts = _over_tiles(lay, tile_moments, x3.size)
        if lay.every_channel:
            total = parts[0]
            for part in parts[1:]:  # tile order: deterministic
                total = merge(total, part)
            return total[1], total[2]
        count, mean, m2 = np.zeros(c, np.int64), np.zeros(c), np.zeros(c)
        for tile, part in zip(lay.tiles, parts, strict=True):  # tile order
            ch = lay.channels(tile)
            count[ch], mean[ch], m2[ch] = merge((count[ch], mean[ch], m2[ch]), part)
        return mean, m2

    @staticmethod
    def affine(x3: np.ndarray, z3: np.ndarray | None, y3: np.ndarray, center: np.ndarray,
               scale: np.ndarray, shift: np.ndarray, relu: bool) -> None:
        cd = center.dtype
        lay = layout(x3.shape, sums=False)
        center, scale, shift = (lay.prepare(v) for v in (center, scale, shift))

        def work(tile: Any) -> None:
            out = lay.part(y3, tile)
            tmp = _affine_tile(out, lay.part(x3, tile), lay.spread(center, tile),
                               lay.spread(scale, tile), lay.spread(shift, tile), cd)
            if z3 is not None:
                tmp += _widened(lay.part(z3, tile), cd)
            if relu:
                np.maximum(tmp, 0, out=tmp)
            if tmp is not out:
                out[...] = tmp

        _over_tiles(lay, work, x3.size, broadcasting=True)

    @staticmethod
    def grad_sums(g3: np.ndarray, x3: np.ndarray, center: np.ndarray,
                  ) -> tuple[np.ndarray, np.ndarray]:
        cd = center.dtype
        lay = layout(x3.shape, sums=True)
        spread = lay.prepare(center)

        def work(tile: Any) -> tuple[np.ndarray, np.ndarray]:
            g = _widened(lay.part(g3, tile), cd)
            with _ShortBuffers(lay.short_rows):
                e = _centred(lay.part(x3, tile), lay.spread(spread, tile), cd)
            return lay.sums(g, tile), lay.sums(np.multiply(e, g, out=e), tile)

        sum_g, sum_gx = np.zeros(x3.shape[1]), np.zeros(x3.shape[1])
        parts = _over_tiles(lay, work, x3.size)
        for tile, (s, p) in zip(lay.tiles, parts, strict=True):  # tile order
            sum_g[lay.channels(tile)] += s
            sum_gx[lay.channels(tile)] += p
        return sum_g, sum_gx

    @staticmethod
    def grad_affine(g3: np.ndarray, x3: np.ndarray, dx3: np.ndarray, center: np.ndarray,
                    a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
        cd = center.dtype
        lay = layout(x3.shape, sums=False)
        center, a, b, c = (lay.prepare(v) for v in (center, a, b, c))

        def work(tile: Any) -> None:
            out = lay.part(dx3, tile)
            tmp = _affine_tile(out, lay.part(x3, tile), lay.spread(center, tile),
                               lay.spread(b, tile), lay.spread(c, tile), cd)
            tmp += np.multiply(_widened(lay.part(g3, tile), cd), lay.spread(a, tile))
            if tmp is not out:
                out[...] = tmp

        _over_tiles(lay, work, x3.size, broadcasting=True)

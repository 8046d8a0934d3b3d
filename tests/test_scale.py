"""The NumPy backend's two engines against the float64 oracle on inputs large enough to take
every one of their paths, and both sides of each threshold: the pure-NumPy engine's rows layout
(tiles of whole planes, of channel runs and of column runs) and periods layout (rows of several
periods, leftover planes, long periods cut into channel runs), the compiled engine's row segments
and blocks of columns, and several threads.

The sizes come from the engines' own thresholds, read when a test runs:
``bncupy.backends._ufuncs.TILE_ELEMENTS`` (pure-NumPy tile), ``ROW_MIN_SUMS`` and ``ROW_MIN``
(shortest row walked as a row by the passes that sum and by the elementwise ones),
``PERIOD_MIN`` (shortest row of periods); ``bncupy.backends.numpy._UNIT_ELEMENTS`` (compiled row
segment), ``_BLOCK_ELEMENTS`` (compiled block of rows) and ``_ROW_MIN`` (shortest row the
compiled engine walks as a row); ``bncupy.backends._pool.PARALLEL_MIN`` (elements from which
work goes to threads). Every output is checked against :mod:`tests.oracle` within
:mod:`tests.tolerances`' bounds (:mod:`tests.agreement`); the engines are never compared with
each other. The CUDA kernels' paths are in :mod:`tests.test_kernels`.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from bncupy.backends import _pool, _ufuncs
from bncupy.backends import numpy as nb
from tests import agreement
from tests.conftest import compiled_engine_missing, needs, requirement

DTYPES = [np.float16, np.float32, np.float64]


def _thresholds() -> dict[str, int]:
    return {"T": _ufuncs.TILE_ELEMENTS, "RS": _ufuncs.ROW_MIN_SUMS, "RE": _ufuncs.ROW_MIN,
            "PM": _ufuncs.PERIOD_MIN, "P": _pool.PARALLEL_MIN, "U": nb._UNIT_ELEMENTS,
            "BL": nb._BLOCK_ELEMENTS, "R": nb._ROW_MIN}


def _rows(t: dict[str, int], per_row: int) -> int:
    """Rows of ``per_row`` values that make at least ``P`` elements (several threads)."""
    return -(-t["P"] // per_row)


# name: (shape from the thresholds, channel axis, dtypes, every operation or training only).
# A, C, B below are the backends' (rows before the channel axis, channels, values after it).
F16, F32, F64 = np.float16, np.float32, np.float64
PATHS = {
    # C*B = T/4: rows layout in tiles of 4 whole planes; 17 planes are several tiles and threads;
    # compiled: one segment per row
    "plane tiles, threads": (lambda t: (17, 4, 64, t["T"] // 1024), 1, [F16, F32, F64], True),
    # C*B = 2T with B = T/4: tiles of 4 channels of one row; compiled: segments of U
    "channel-run tiles": (lambda t: (2, 8, t["T"] // 4), 1, [F16, F32], False),
    # B = T + 17 > T: tiles of T columns of one channel, the last of 17; compiled: segments of
    # U, the last of 17
    "column-run tiles, short last segment": (lambda t: (2, 3, t["T"] + 17), 1, [F16, F64], True),
    # channels last: periods of C, rows of ceil(PM / C) periods and leftover planes, several
    # tiles; compiled: blocks of BL // C rows
    "channels last, threads": (lambda t: (_rows(t, 12 * 48), 3, 4, 48), -1, [F16, F32, F64],
                               True),
    # channels last with C > T: one period per row, cut into runs of channels; compiled: one
    # block of rows
    "channels last, C over a tile": (lambda t: (5, t["T"] + 3), 1, [F32], False),
    # B under the compiled rows minimum: periods; compiled: blocks of columns
    "B = R - 1": (lambda t: (_rows(t, 4 * (t["R"] - 1)), 4, t["R"] - 1), 1, [F16], True),
    "B = R": (lambda t: (_rows(t, 4 * t["R"]), 4, t["R"]), 1, [F32], False),
    # the pure-NumPy engine's row minimums: periods for every pass, rows for the sums only,
    # rows for every pass
    "B = RS - 1": (lambda t: (_rows(t, 4 * (t["RS"] - 1)), 4, t["RS"] - 1), 1, [F32], False),
    "B = RS": (lambda t: (_rows(t, 4 * t["RS"]), 4, t["RS"]), 1, [F32], False),
    "B = RE - 1": (lambda t: (40, 4, t["RE"] - 1), 1, [F32], True),
    "B = RE": (lambda t: (40, 4, t["RE"]), 1, [F32], False),
    # one element under and at the thread threshold (one channel, channels last)
    "P - 1 elements": (lambda t: (t["P"] - 1, 1), 1, [F32], False),
    "P elements": (lambda t: (t["P"], 1), 1, [F32], False),
    # B = T: one plane per tile; B = T + 1: column runs, the last tile one element
    "B = T": (lambda t: (3, 1, t["T"]), 1, [F32], False),
    "B = T + 1": (lambda t: (3, 1, t["T"] + 1), 1, [F32], False),
    # C*B = T + 2 with B <= T: channel runs of one channel
    "C*B = T + 2": (lambda t: (3, 2, t["T"] // 2 + 1), 1, [F32], False),
    # rows of exactly one segment, and of one segment and one value
    "B = U": (lambda t: (4, 3, t["U"]), 1, [F32], False),
    "B = U + 1": (lambda t: (4, 3, t["U"] + 1), 1, [F32], False),
}
CASES = [pytest.param(name, dtype, id=f"{name}-{np.dtype(dtype).name}")
         for name, (_, _, dtypes, _) in PATHS.items() for dtype in dtypes]


def test_the_compiled_engine_loads_wherever_numba_is_installed():
    """A compiled engine that fails to import falls back to NumPy silently: here it fails,
    saying why, wherever Numba is importable or required (tox env ``numba``)."""
    reason = compiled_engine_missing()
    if reason is not None:
        needs("numba", "numba", "numba is not installed (tox env 'numba' has it)")
        pytest.fail(f"numba imports, but {reason}")
    assert nb.engine().name == "numba" or os.environ.get("BNCUPY_CPU_ENGINE") == "numpy"


@pytest.fixture(params=["numpy", "numba"])
def engine(request, monkeypatch):
    """The NumPy backend with one engine forced and three threads allowed."""
    if request.param == "numba" and (reason := compiled_engine_missing()) is not None:
        requirement("numba", reason)
    monkeypatch.setenv("BNCUPY_CPU_ENGINE", request.param)
    monkeypatch.setenv("BNCUPY_NUM_THREADS", "3")
    assert nb.engine().name == request.param
    return request.param


def _shape(name: str) -> tuple[tuple[int, ...], int]:
    build, axis, _, _ = PATHS[name]
    return build(_thresholds()), axis


@pytest.mark.parametrize("name, dtype", CASES)
def test_batch_norm_paths_match_the_oracle(engine, name, dtype):
    shape, axis = _shape(name)
    offset = {np.float16: 300.0, np.float32: 3e4, np.float64: 1e6}[dtype]
    x = agreement.data(shape, dtype, seed=len(name), axis=axis, offset=offset)
    agreement.batch_norm(np, x, axis, seed=1, fused=PATHS[name][3])


@pytest.mark.parametrize("name, dtype", [("plane tiles, threads", F32),
                                         ("channels last, threads", F16)])
def test_renorm_and_ghost_batches_at_scale(engine, name, dtype):
    shape, axis = _shape(name)
    x = agreement.data(shape, dtype, seed=2, axis=axis, offset=10.0)
    agreement.batch_renorm(np, x, axis, seed=3)
    agreement.ghost_batch_norm(np, x, axis, size=-(-shape[0] // 2), seed=4)


@pytest.mark.parametrize("shape", [(4, 16), (2, 3, 5), (5, 1), "under", "at"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_small_rows_match_the_oracle(engine, shape, dtype):
    """LayerNorm rows under ``SMALL_ELEMENTS`` values (the compiled engine's one-call kernel)
    and at it (the engines' passes)."""
    if isinstance(shape, str):  # the last row count under the threshold, and the first not
        under = shape == "under"
        shape = (-(-nb.SMALL_ELEMENTS // 32) - under, 32)
        assert (math.prod(shape) < nb.SMALL_ELEMENTS) == under
    x = agreement.data(shape, dtype, seed=5, axis=-1, offset=300.0)
    agreement.family(np, "layer", x, seed=6)


def test_the_cases_take_the_paths_they_name():
    """The shapes above select what their names say, by the thresholds' definitions."""
    t = _thresholds()
    for name, (build, axis, _, _) in PATHS.items():
        shape = build(t)
        a = int(np.prod(shape[:axis % len(shape)]))
        c = shape[axis]
        b = int(np.prod(shape[axis % len(shape) + 1:]))
        size = a * c * b
        if "threads" in name or name == "P elements":
            assert size >= t["P"], name
        if name == "P - 1 elements":
            assert size == t["P"] - 1
        if name.startswith("plane tiles"):
            assert c * b <= t["T"] and a > t["T"] // (c * b) and b >= t["RE"]
        if name.startswith("channel-run") or name.startswith("C*B"):
            assert c * b > t["T"] >= b >= t["RE"]
        if name.startswith("column-run") or name == "B = T + 1":
            assert b > t["T"] and b > t["U"] and b % t["U"]
        if name == "channels last, threads":  # several rows of periods, and leftover planes
            k = -(-t["PM"] // c)
            assert b == 1 and a // k > 1 and a % k and a > t["BL"] // c
        if name == "channels last, C over a tile":
            assert b == 1 and 16 * c > t["T"]
        if name == "B = R - 1":
            assert b < t["RS"] and a > t["BL"] // (c * b)

"""The NumPy backend's own promises: both engines (pure NumPy, Numba) agree on data that selects
each of their paths, constant channels map to exactly beta, float32 statistics keep their
precision at huge means in both layouts, and threads neither change results nor exceed
``BNCUPY_NUM_THREADS``."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

import bncupy as bn
from bncupy.backends import _pool
from bncupy.backends import numpy as nb
from tests.conftest import compiled_engine_missing, requires

DTYPES = [np.float16, np.float32, np.float64]
NUMBA = pytest.param("numba", marks=requires("numba", compiled_engine_missing()))
ENGINES = ["numpy", NUMBA]
# (A, C, B) shapes, each named by the compiled path it selects
SHAPES = {
    "rows": (5, 3, 100),                      # channel first, one segment per row
    "short rows": (9, 3, 40),                 # channel first, rows under _ROW_MIN: columns
    "row segments": (2, 3, 3 * nb._UNIT_ELEMENTS + 17),  # rows longer than a unit
    "columns": (3 * (nb._BLOCK_ELEMENTS // 6) + 7, 6, 1),  # channels last, several blocks
    "wide columns": (3, 2 * nb._UNIT_ELEMENTS + 5, 1),   # channels last, C over a unit
}


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    """Forces an engine; for the compiled one, records which kernels ran."""
    monkeypatch.setenv("BNCUPY_CPU_ENGINE", request.param)
    ran: list[str] = []
    if request.param == "numba":
        kernels = nb._load_compiled().k

        def spy(name):
            def call(*args):
                ran.append(name)
                return getattr(kernels, name)(*args)
            return call

        names = [n for n in dir(kernels) if n.startswith(("row_", "column_", "merge_"))]
        monkeypatch.setattr(nb, "_COMPILED", [nb.CompiledPasses(
            SimpleNamespace(**{n: spy(n) for n in names}))])
    return SimpleNamespace(name=request.param, ran=ran)


def _data(shape, dtype, kind, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    x = {"zero-mean": x, "offset": x + 5, "huge offset": x + 1e4, "post-relu": np.maximum(x, 0)}[kind]
    return x.astype(dtype)


def _numpy_engine(monkeypatch, fn, *args):
    monkeypatch.setenv("BNCUPY_CPU_ENGINE", "numpy")
    try:
        return fn(*args)
    finally:
        monkeypatch.setenv("BNCUPY_CPU_ENGINE", "auto")


@pytest.mark.parametrize("engine", [NUMBA], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", SHAPES)
def test_compiled_passes_agree_with_numpy_passes(engine, monkeypatch, dtype, path):
    shape = SHAPES[path]
    x = _data(shape, dtype, "offset")
    dy = _data(shape, dtype, "zero-mean", seed=1)
    z = _data(shape, dtype, "zero-mean", seed=2)
    rng = np.random.default_rng(3)
    w, b = rng.uniform(0.5, 2, shape[1]), rng.standard_normal(shape[1])
    grad_coef = (np.full(shape[1], 5.0), w, -0.1 * w, b)  # center, a, b, c
    both = []
    for run in (lambda f, *a: f(*a), lambda f, *a: _numpy_engine(monkeypatch, f, *a)):
        count, mean, m2 = run(nb.stats, x, 1)
        invstd = 1 / np.sqrt(m2 / count + 1e-5)
        y, coef = run(nb.normalize_with, x, 1, mean, invstd, w, b, z, True)
        sums = run(nb.backward_sums, dy, x, 1, mean, invstd)
        dx = run(nb.backward_apply, dy, x, 1, *grad_coef)
        both.append((mean, m2, y, coef, sums, dx))
    (mean, m2, y, coef, sums, dx), (mean_n, m2_n, y_n, coef_n, sums_n, dx_n) = both
    prefix = "row_" if shape[2] >= nb._ROW_MIN else "column_"
    assert {prefix + p for p in ("moments", "affine", "grad_sums", "grad_affine")} <= set(engine.ran)
    assert not any(k.startswith("column_" if prefix == "row_" else "row_") for k in engine.ran)
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(mean, mean_n, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(m2, m2_n, rtol=rtol)
    np.testing.assert_allclose(sums, sums_n, rtol=rtol, atol=rtol * shape[0] * shape[2])
    # Elementwise passes: the same operations in the same order, so bitwise equal outputs
    # (given equal coefficients: rerun the NumPy engine's apply with the compiled statistics).
    y_same = _numpy_engine(monkeypatch, nb.apply, x, 1, *coef, z, True)
    np.testing.assert_array_equal(y, y_same)
    np.testing.assert_array_equal(dx, dx_n)
    np.testing.assert_allclose(y.astype(np.float64), y_n.astype(np.float64),
                               rtol=1e-2 if dtype == np.float16 else 1e-5, atol=1e-3)


@pytest.mark.parametrize("engine", [NUMBA], indirect=True)
@pytest.mark.parametrize("path", SHAPES)
def test_each_compiled_path_runs_where_its_layout_says(engine, path):
    shape = SHAPES[path]
    x = _data(shape, np.float32, "zero-mean")
    y, mean, invstd = bn.batch_norm_forward(x, None, None, training=True)
    bn.batch_norm_backward(x, x, None, mean, invstd)
    prefix = "row_" if shape[2] >= nb._ROW_MIN else "column_"
    assert list(dict.fromkeys(engine.ran)) == [prefix + "moments", "merge_moments", prefix + "affine",
                          prefix + "grad_sums", prefix + "grad_affine"]


@requires("numba", compiled_engine_missing())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_a_fused_forward_is_bitwise_its_separate_passes(monkeypatch, dtype, path, training):
    shape = SHAPES[path]
    assert 0 < np.prod(shape) < _pool.PARALLEL_MIN  # the fused path's arrays
    x = _data(shape, dtype, "offset")
    rng = np.random.default_rng(3)
    w, b = rng.uniform(0.5, 2, shape[1]), rng.standard_normal(shape[1]).astype(np.float32)
    monkeypatch.delenv("BNCUPY_CPU_ENGINE", raising=False)
    assert nb._fused_kernels(x, 1, None, w, b) is not None
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(nb, "_fused_kernels", lambda *args: None)
        rm, rv = np.full(shape[1], 5.0, np.float32), np.full(shape[1], 2.0, np.float32)
        if training:
            out = nb.normalize_train(x, 1, w, b, 1e-5, rm, rv, 0.1, relu=True)
        else:
            out = nb.normalize_eval(x, 1, rm, rv, w, b, 1e-5, relu=True)
        runs.append((*out[:4], *out[4], rm, rv))
    for fused, separate in zip(*runs, strict=True):
        assert fused.dtype == separate.dtype
        np.testing.assert_array_equal(fused, separate)


@requires("numba", compiled_engine_missing())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_a_fused_backward_is_bitwise_its_separate_passes(monkeypatch, dtype, path, training):
    shape = SHAPES[path]
    x, dy = _data(shape, dtype, "offset"), _data(shape, dtype, "zero-mean", seed=1)
    mean = x.astype(np.float64).mean(axis=(0, 2)).astype(np.float32)
    invstd = np.random.default_rng(3).uniform(0.5, 2, shape[1]).astype(np.float32)
    monkeypatch.delenv("BNCUPY_CPU_ENGINE", raising=False)
    k = nb._fused_kernels(x, 1, None, invstd, mean, invstd)
    parts = nb.CompiledPasses._units(shape)[4]
    assert (nb._fused_backward(k, dy, x, 1, invstd, mean, invstd, training) is not None) == (
        parts == 1)  # one partial per channel and row or block: "rows", "columns", "wide columns"
    for weight in (invstd.astype(np.float64), None):
        runs = []
        for fused in (True, False):
            if not fused:
                monkeypatch.setattr(nb, "_fused_backward", lambda *args: None)
            runs.append(nb.backward(dy, x, 1, weight, mean, invstd, training)[:3])
        monkeypatch.undo()
        monkeypatch.delenv("BNCUPY_CPU_ENGINE", raising=False)
        for fused, separate in zip(*runs, strict=True):
            assert fused.dtype == separate.dtype
            np.testing.assert_array_equal(fused, separate)


@pytest.mark.parametrize("engine", [NUMBA], indirect=True)
@pytest.mark.parametrize("kind", ["zero-mean", "offset", "huge offset", "post-relu"])
def test_the_data_never_selects_a_different_path(engine, kind):
    shape = SHAPES["rows"]
    reference: list[str] = []
    for data in ("zero-mean", kind):
        engine.ran.clear()
        bn.batch_norm(_data(shape, np.float32, data), None, None, training=True)
        reference.append(",".join(engine.ran))
    assert reference[0] == reference[1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("value", [0.1, 1 / 3, -37.25, 1e6, 6e4, 2.0**-20, "random"])
def test_constant_channels_give_exactly_beta(engine, dtype, axis, value):
    c = 3
    shape = (4, c, 7, 9) if axis == 1 else (4, 7, 9, c)
    rng = np.random.default_rng(7)
    values = rng.uniform(-1e4, 1e4, c) if value == "random" else np.full(c, value)
    if dtype == np.float16:
        values = np.clip(values, -6e4, 6e4)
    bshape = (1, c, 1, 1) if axis == 1 else (1, 1, 1, c)
    x = np.broadcast_to(values.reshape(bshape), shape).astype(dtype)
    for gamma, beta in [([1.5, 2.0, -1.0], [0.5, -2.0, 3.25]), ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])]:
        g, b = np.array(gamma, np.float32), np.array(beta, np.float32)
        y = bn.batch_norm(x, None, None, g, b, training=True, axis=axis)
        expected = np.broadcast_to(b.reshape(bshape), shape).astype(dtype)
        np.testing.assert_array_equal(y, expected)
        mean, var = bn.moments(x, axis=axis)
        np.testing.assert_array_equal(mean, values.astype(dtype).astype(mean.dtype))
        np.testing.assert_array_equal(var, 0)


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("ratio", [1e4, 1e6])
def test_float32_variance_keeps_1e_5_at_huge_mean_over_std(engine, axis, ratio):
    rng = np.random.default_rng(2)
    c = 8
    shape = (16, c, 30, 30) if axis == 1 else (16, 30, 30, c)
    bshape = (1, c, 1, 1) if axis == 1 else (1, 1, 1, c)
    std = rng.uniform(0.5, 2.0, c).reshape(bshape)
    x = (rng.standard_normal(shape) * std + ratio * std).astype(np.float32)
    axes = tuple(i for i in range(4) if i != axis % 4)
    truth = x.astype(np.float64).var(axis=axes)
    _, var = bn.moments(x, axis=axis)
    assert np.max(np.abs(var.astype(np.float64) / truth - 1)) <= 1e-5


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_results_do_not_depend_on_the_thread_count(engine, monkeypatch, axis, dtype):
    # one thread: one call of fused_forward and of fused_backward; more: the separate passes
    shape = (8, 16, 64, 64) if axis == 1 else (8, 64, 64, 16)
    assert np.prod(shape) >= _pool.PARALLEL_MIN
    x = _data(shape, dtype, "offset")
    outs = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("BNCUPY_NUM_THREADS", threads)
        y, mean, invstd = bn.batch_norm_forward(x, None, None, training=True, axis=axis)
        outs.append((y, mean, invstd, *bn.batch_norm_backward(x, x, None, mean, invstd,
                                                               axis=axis)))
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_work_runs_on_at_most_bncupy_num_threads(monkeypatch, threads):
    """Every range waits at a barrier for ``threads`` parties: it is passed only if that many
    ranges run at once, on as many threads (a broken barrier raises instead of hanging)."""
    monkeypatch.setenv("BNCUPY_NUM_THREADS", str(threads))
    seen: set[int] = set()
    lock = threading.Lock()
    barrier = threading.Barrier(threads, timeout=10)

    def work(lo, hi):
        with lock:
            seen.add(threading.get_ident())
        barrier.wait()

    # _pool.PARALLEL_MIN: the element count from which the backend hands work to threads
    _pool.run(work, 12, _pool.PARALLEL_MIN)
    assert len(seen) == threads
    assert threading.get_ident() in seen  # the caller works too
    seen.clear()
    barrier = threading.Barrier(1)
    _pool.run(work, 12, _pool.PARALLEL_MIN - 1)  # small work stays on the caller
    assert seen == {threading.get_ident()}


def test_a_failing_range_raises_after_every_range_has_finished(monkeypatch):
    """The caller's range fails at once; the other range finishes only when the failure has
    been seen by the test, or after a timeout. So ``done`` holds it at the ``raises`` exactly
    when the backend waits for every range before raising."""
    monkeypatch.setenv("BNCUPY_NUM_THREADS", "2")
    done = []
    seen_failure = threading.Event()

    def work(lo, hi):
        if lo == 0:
            raise ValueError("first range")
        seen_failure.wait(timeout=0.5)
        done.append(lo)

    try:
        with pytest.raises(ValueError, match="first range"):
            _pool.run(work, 2, _pool.PARALLEL_MIN)
        assert done == [1]
    finally:
        seen_failure.set()


def test_non_contiguous_and_mixed_dtype_operands(engine):
    base = _data((6, 5, 8, 10), np.float32, "offset")
    x = base[..., ::2]  # strided view
    dy = _data(x.shape, np.float64, "zero-mean", seed=4)
    z = _data(x.shape, np.float16, "zero-mean", seed=5)
    y, mean, invstd = bn.batch_norm_forward(x, None, None, training=True, residual=z)
    xc = np.ascontiguousarray(x)
    y_ref = bn.batch_norm(xc, None, None, training=True, residual=z.astype(np.float32))
    np.testing.assert_array_equal(y, y_ref)
    dx = bn.batch_norm_backward(dy, x, None, mean, invstd)[0]
    dx_ref = bn.batch_norm_backward(dy.astype(np.float32), xc, None, mean, invstd)[0]
    np.testing.assert_array_equal(dx, dx_ref)


@pytest.mark.filterwarnings("error")  # inf - inf is no reason to warn
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_propagate(engine, dtype):
    x = _data((4, 3, 5, 5), dtype, "zero-mean")
    x[1, 0, 2, 2] = np.nan
    x[2, 1, 0, 0] = np.inf
    y = bn.batch_norm(x, None, None, training=True, activation="relu")
    assert np.isnan(y[:, 0]).all() and np.isnan(y[:, 1]).all()
    assert np.isfinite(y[:, 2]).all()

"""The CUDA kernels through the CuPy backend's launch plan, on a GPU or on the CPU execution
target (tox env ``emulated``): every public operation against the float64 oracle
(:mod:`tests.agreement`, within :mod:`tests.tolerances`' bounds) on every path the launch plan
can pick (vector width, index type, layouts, splits per channel, rows per block), bitwise
determinism whatever the block order and index type, streams. Skipped (and reported so) where
neither can run."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import bncupy as bn
from bncupy.backends import _cuda
from bncupy.backends import cupy as cupy_backend
from tests import agreement, oracle
from tests.arrays import to_numpy
from tests.conftest import EMULATED, requires_gpu
from tests.tolerances import Bounds, channels, check

pytestmark = [requires_gpu, pytest.mark.gpu]


@pytest.fixture(scope="module")
def xp():
    return cupy_backend.require()


def _data(shape, dtype, seed=0, offset=5.0):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + offset).astype(dtype)


_host = to_numpy


def _run_all(xp, x, axis=1, seed=1, put=None):
    """Every public path on device input; host copies of every output, in a fixed order."""
    put = put or xp.asarray
    c = x.shape[axis]
    acc = np.float64 if x.dtype == np.float64 else np.float32
    rng = np.random.default_rng(seed)
    xd = put(x)
    w, b = xp.asarray(rng.uniform(0.5, 2, c).astype(acc)), xp.asarray(rng.standard_normal(c).astype(acc))
    rm, rv = xp.zeros(c, acc), xp.ones(c, acc)
    dy = put(rng.standard_normal(x.shape).astype(x.dtype))
    z = put(rng.standard_normal(x.shape).astype(x.dtype))
    y, m, s = bn.batch_norm_forward(xd, rm, rv, w, b, True, axis=axis)
    fused = bn.batch_norm(xd, None, None, w, b, training=True, axis=axis, activation="relu",
                          residual=z)
    ev = bn.batch_norm(xd, rm, rv, w, b, training=False, axis=axis, activation="relu")
    dx, dw, db = bn.batch_norm_backward(dy, xd, w, m, s, axis=axis)
    mom = bn.welford(xd, axis=axis)
    return [_host(a) for a in (y, m, s, rm, rv, fused, ev, dx, dw, db, mom.mean, mom.m2)]


# (16, 8, 32, 32): two splits per channel at 132 SMs; (512, 48), (16, 12, 12, 64): channels
# last over many splits; odd extents: width-1 loads; (2, 1, 1): one value per channel but two.
CASES = [((16, 8, 32, 32), 1), ((8, 5, 7, 7), 1), ((5, 7, 33), 1), ((512, 48), 1),
         ((3, 5, 6, 7, 8), 1), ((16, 12, 12, 64), -1), ((4, 9, 9, 3), -1), ((2, 1, 1), 1)]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", CASES)
def test_every_path_matches_the_oracle(xp, shape, axis, dtype):
    x = _data(shape, dtype)
    agreement.batch_norm(xp, x, axis, seed=1)


def _misaligned(xp, a):
    """A device copy of ``a`` starting one element into its allocation (unaligned loads)."""
    flat = xp.empty(a.size + 1, a.dtype)
    flat[1:] = xp.asarray(np.ascontiguousarray(a).ravel())
    return flat[1:].reshape(a.shape)


@pytest.mark.parametrize("sms", [1, 132, 1000])
@pytest.mark.parametrize("aligned", [True, False])
def test_launch_geometries_match_the_oracle_and_index_types_give_the_same_bits(
        xp, monkeypatch, sms, aligned):
    """One split per channel up to many, aligned and unaligned data: every result against the
    oracle; and 32- or 64-bit indexing changes no bit (the index type changes no order)."""
    # The split count and index type are the launch plan's (cupy_backend._geometry(...).splits,
    # cupy_backend._INDEX64_FROM), forced here through the runtime's SM count and the threshold.
    monkeypatch.setattr(cupy_backend.runtime(), "sm_count", lambda: sms)
    shape = (16, 4, 48, 48)
    x = _data(shape, np.float32, seed=3)
    put = xp.asarray if aligned else (lambda a: _misaligned(xp, a))
    geometry = cupy_backend._geometry(put(x), 1)
    assert geometry.width == 4  # 16-byte loads after `head` single values, aligned or not
    assert geometry.head == (0 if aligned else 3)
    if sms == 1000:
        assert geometry.splits > 1
    agreement.batch_norm(xp, x, 1, seed=1, put=put)
    narrow = _run_all(xp, x, put=put)
    monkeypatch.setattr(cupy_backend, "_INDEX64_FROM", 0)
    assert cupy_backend._geometry(put(x), 1).index == "unsigned long long"
    for a, b in zip(narrow, _run_all(xp, x, put=put), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape, axis", [((16, 24, 28, 28), 1), ((16, 28, 28, 24), -1),
                                         ((2048, 40), 1)])
def test_bitwise_deterministic_over_calls(xp, dtype, shape, axis):
    """Repeated calls agree bit for bit. On the CPU execution target every launch runs its blocks
    (and threads) in a different random order, so this is determinism across block orders."""
    x = _data(shape, dtype, seed=7)
    first = _run_all(xp, x, axis)
    for _ in range(3 if EMULATED else 10):
        for a, b in zip(first, _run_all(xp, x, axis), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_huge_means_keep_precision(xp, offset):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, 8, 32, 32)) + rng.uniform(-offset, offset, (1, 8, 1, 1)))
    x = x.astype(np.float32)
    truth = x.astype(np.float64).var(axis=(0, 2, 3))
    _, var = bn.moments(xp.asarray(x))
    assert np.abs(_host(var) / truth - 1).max() <= 1e-5


def test_float16_near_its_largest_values(xp):
    rng = np.random.default_rng(3)
    x = (6.0e4 + rng.standard_normal((16, 4, 16, 16)) * 256).clip(-65504, 65504).astype(np.float16)
    y = _host(bn.batch_norm(xp.asarray(x), None, None, training=True))
    assert np.isfinite(y).all()
    check(channels(y, 1), channels(oracle.forward(x)[0], 1), Bounds(channels(x, 1), x.dtype).y,
          "y")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_propagate_to_their_channel_only(xp, bad):
    x = np.random.default_rng(4).standard_normal((4, 3, 8, 8)).astype(np.float32)
    x[2, 1, 3, 3] = bad
    y = _host(bn.batch_norm(xp.asarray(x), None, None, training=True))
    ref = bn.batch_norm(x, None, None, training=True)
    assert np.isnan(y[:, 1]).all() and np.isnan(ref[:, 1]).all()
    assert np.isfinite(y[:, [0, 2]]).all()


def test_non_default_stream(xp):
    x = xp.asarray(_data((16, 32, 20, 20), np.float32, seed=6))
    expected = _host(bn.batch_norm(x, None, None, training=True))
    stream = xp.cuda.Stream(non_blocking=True)
    with stream:
        rm, rv = xp.zeros(32, np.float32), xp.ones(32, np.float32)
        y = bn.batch_norm(x, rm, rv, training=True)
        _, m, s = bn.batch_norm_forward(x, None, None, training=True)
        dx, _, _ = bn.batch_norm_backward(y, x, None, m, s)
    stream.synchronize()
    np.testing.assert_array_equal(_host(y), expected)
    assert np.isfinite(_host(dx)).all() and (_host(rm) != 0).any()


def _threads(fn, n=4):
    results, errors = [None] * n, []

    def run(i):
        try:
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("mode", ["streams", "per-thread default stream"])
def test_threads_at_once_give_single_threaded_bits(xp, monkeypatch, mode):
    """Forward and backward from 4 host threads at once equal the single-threaded results bit
    for bit, on separate non-blocking streams and on CuPy's per-thread default stream (one
    handle for every thread, so arrival counters must be private to each thread)."""
    if mode != "streams":
        if EMULATED:
            monkeypatch.setattr(xp, "per_thread_default_stream", True)
        elif xp.cuda.get_current_stream().ptr != cupy_backend._PER_THREAD_STREAM:
            pytest.skip("run with CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1 for this mode")
    inputs = [_data((8, 16, 24, 24), np.float32, seed=i) for i in range(4)]
    expected = [_run_all(xp, x, seed=i) for i, x in enumerate(inputs)]

    def work(i):
        if mode == "streams":
            with xp.cuda.Stream(non_blocking=True) as stream:
                out = _run_all(xp, inputs[i], seed=i)
                stream.synchronize()
                return out
        return _run_all(xp, inputs[i], seed=i)

    for got, want in zip(_threads(work), expected, strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


def test_workspaces_are_per_stream_and_per_thread_on_the_per_thread_stream(xp, monkeypatch):
    x = xp.asarray(_data((4, 3, 5, 5), np.float32))
    stream = xp.cuda.Stream(non_blocking=True)
    with stream:
        bn.batch_norm(x, None, None, training=True)
        key, _ = _cuda.workspace(stream)
    assert key in _cuda._workspaces
    del stream
    gc.collect()
    assert key not in _cuda._workspaces  # freed with its stream

    if EMULATED:
        monkeypatch.setattr(xp, "per_thread_default_stream", True)
    elif xp.cuda.get_current_stream().ptr != _cuda.PER_THREAD_STREAM:
        pytest.skip("run with CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1 for the per-thread part")

    def counters(_):
        bn.batch_norm(x, None, None, training=True)
        return _cuda.workspace(xp.cuda.get_current_stream())[1].counters  # kept alive: no reuse

    assert len({b.data.ptr for b in _threads(counters)}) == 4  # one per thread, none shared


@pytest.mark.parametrize("mean_dtype, var_dtype", [(np.float32, np.float16),
                                                   (np.float32, np.float64)])
def test_running_statistics_of_different_dtypes_are_both_updated(xp, mean_dtype, var_dtype):
    """float32 input, running_mean in the accumulator dtype, running_var in another: both are
    updated (found by tests/test_properties.py's mixed parameter dtypes)."""
    x = _data((4, 3, 5), np.float32, seed=8)
    rm0, rv0 = np.zeros(3, mean_dtype), np.full(3, 1.5, var_dtype)
    rm, rv = xp.asarray(rm0.copy()), xp.asarray(rv0.copy())
    bn.batch_norm(xp.asarray(x), rm, rv, None, None, True, 0.1)
    _, _, _, ref_rm, ref_rv = oracle.forward(x, 1, None, None, 1e-5, True, rm0, rv0, 0.1)
    bound = Bounds(channels(x, 1), x.dtype)
    bound_rm, bound_rv = bound.running(rm0, rv0, 0.1)
    check(_host(rm), ref_rm, bound_rm, "running_mean")
    check(_host(rv), ref_rv, bound_rv, "running_var")


FAMILY_CASES = [  # (function, shape): warp/partial-block/block per row, split rows, layouts
    ("layer", (64, 96)), ("layer", (32, 768)), ("layer", (8, 4096)), ("layer", (3, 40000)),
    ("layer", (5, 7, 11)), ("group-cf", (4, 8, 14, 14)), ("group-cf", (2, 4, 70000)),
    ("group-cl", (4, 9, 9, 16)), ("instance-cl", (3, 5, 7, 6)), ("instance-cf", (2, 6, 7, 9)),
]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("name, shape", FAMILY_CASES)
@pytest.mark.parametrize("index64", [False, True])
def test_normalization_family_paths_match_the_oracle(xp, monkeypatch, name, shape, dtype,
                                                     index64):
    if index64:  # the launch plan's threshold (cupy_backend._INDEX64_FROM), forced
        monkeypatch.setattr(cupy_backend, "_INDEX64_FROM", 0)
    agreement.family(xp, name, _data(shape, dtype, seed=11, offset=3.0), seed=13)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((16, 8, 32, 32), 1), ((64, 12, 12, 16), -1)])
def test_renorm_and_ghost_batches_match_the_oracle(xp, shape, axis, dtype):
    x = _data(shape, dtype, seed=5)
    agreement.batch_renorm(xp, x, axis, seed=6)
    agreement.ghost_batch_norm(xp, x, axis, size=5, seed=7)

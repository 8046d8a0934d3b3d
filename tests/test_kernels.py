"""The CUDA kernels through the CuPy backend's launch plan, on a GPU or on the CPU execution
target (tox env ``emulated``): agreement with the NumPy reference on every path the launch plan
can pick (vector width, index type, layouts, splits per channel), bitwise determinism whatever the
block order, streams. Skipped (and reported so) where neither can run."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import bncupy as bn
from bncupy.backends import _cuda
from bncupy.backends import cupy as cupy_backend
from tests import oracle
from tests.arrays import to_numpy
from tests.conftest import EMULATED, requires_gpu
from tests.test_properties import TOL

pytestmark = [requires_gpu, pytest.mark.gpu]


@pytest.fixture(scope="module")
def xp():
    return cupy_backend.require()


def _data(shape, dtype, seed=0, offset=5.0):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + offset).astype(dtype)


_host = to_numpy


def _run_all(xp, x, axis=1, seed=1):
    """Every public path on device input; host copies of every output, in a fixed order."""
    c = x.shape[axis]
    acc = np.float64 if x.dtype == np.float64 else np.float32
    rng = np.random.default_rng(seed)
    xd = xp.asarray(x)
    w, b = xp.asarray(rng.uniform(0.5, 2, c).astype(acc)), xp.asarray(rng.standard_normal(c).astype(acc))
    rm, rv = xp.zeros(c, acc), xp.ones(c, acc)
    dy = xp.asarray(rng.standard_normal(x.shape).astype(x.dtype))
    z = xp.asarray(rng.standard_normal(x.shape).astype(x.dtype))
    y, m, s = bn.batch_norm_forward(xd, rm, rv, w, b, True, axis=axis)
    fused = bn.batch_norm(xd, None, None, w, b, training=True, axis=axis, activation="relu",
                          residual=z)
    ev = bn.batch_norm(xd, rm, rv, w, b, training=False, axis=axis, activation="relu")
    dx, dw, db = bn.batch_norm_backward(dy, xd, w, m, s, axis=axis)
    mom = bn.welford(xd, axis=axis)
    return [_host(a) for a in (y, m, s, rm, rv, fused, ev, dx, dw, db, mom.mean, mom.m2)]


CASES = [((16, 8, 32, 32), 1), ((8, 5, 7, 7), 1), ((5, 7, 33), 1), ((512, 48), 1),
         ((3, 5, 6, 7, 8), 1), ((16, 12, 12, 64), -1), ((4, 9, 9, 3), -1), ((2, 1, 1), 1)]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", CASES)
def test_every_path_agrees_with_the_numpy_reference(xp, shape, axis, dtype):
    x = _data(shape, dtype)
    dev = _run_all(xp, x, axis)
    with bn.use_backend("numpy"):
        ref = _run_all(np, x, axis)
    names = ("y", "mean", "invstd", "running_mean", "running_var", "fused", "eval", "dx", "dw",
             "db", "welford mean", "welford m2")
    rtol, atol = TOL[dtype]
    count = x.size // x.shape[axis]
    for name, a, r in zip(names, dev, ref, strict=True):
        scale = count * 4 if name in ("dw", "db", "welford m2") else 8
        np.testing.assert_allclose(a.astype(np.float64), r.astype(np.float64), rtol=rtol,
                                   atol=atol * scale, err_msg=name)


@pytest.mark.parametrize("sms", [1, 132, 1000])
@pytest.mark.parametrize("index64", [False, True])
@pytest.mark.parametrize("aligned", [True, False])
def test_launch_geometries_give_the_same_bits(xp, monkeypatch, sms, index64, aligned):
    """One split per channel up to many, 32- and 64-bit indexing, vector and width-1 loads: the
    reference result is the default geometry's, bit for bit (the merge order is fixed by the
    grid, so only the statistics may differ, within rounding)."""
    if not EMULATED and (sms != 132 or not index64):
        pytest.skip("SM count and index type are forced on the CPU execution target only")
    shape = (16, 4, 48, 48)
    x = _data(shape, np.float32, seed=3)
    flat = np.empty(x.size + 1, np.float32)
    if not aligned:  # a view one element into its allocation: 3 single values, then vectors
        flat[1:] = x.ravel()
    reference = _run_all(xp, x)
    monkeypatch.setattr(cupy_backend.runtime(), "sms", sms, raising=False)
    if index64:
        monkeypatch.setattr(cupy_backend, "_INDEX64_FROM", 0)
    xd = xp.asarray(flat)[1:].reshape(shape) if not aligned else xp.asarray(x)
    geometry = cupy_backend._geometry(xd, 1)
    assert geometry.index == ("unsigned long long" if index64 else "unsigned int")
    assert geometry.width == 4  # 16-byte loads after `head` single values, aligned or not
    assert geometry.head == (0 if aligned else 3)
    if sms == 1000:
        assert geometry.splits > 1
    with bn.use_backend("numpy"):
        ref = _run_all(np, x)
    # The device path on the unaligned view.
    got = _run_all(xp, x) if aligned else _run_all_view(xp, xd)
    for a, r, d in zip(got, ref, reference, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a, d, rtol=1e-5, atol=1e-5)


def _run_all_view(xp, xd):
    """:func:`_run_all` on an existing device array (kept as it is, unaligned)."""
    c = xd.shape[1]
    rng = np.random.default_rng(1)
    w = xp.asarray(rng.uniform(0.5, 2, c).astype(np.float32))
    b = xp.asarray(rng.standard_normal(c).astype(np.float32))
    rm, rv = xp.zeros(c, np.float32), xp.ones(c, np.float32)
    dy = xp.asarray(rng.standard_normal(xd.shape).astype(np.float32))
    z = xp.asarray(rng.standard_normal(xd.shape).astype(np.float32))
    y, m, s = bn.batch_norm_forward(xd, rm, rv, w, b, True)
    fused = bn.batch_norm(xd, None, None, w, b, training=True, activation="relu", residual=z)
    ev = bn.batch_norm(xd, rm, rv, w, b, training=False, activation="relu")
    dx, dw, db = bn.batch_norm_backward(dy, xd, w, m, s)
    mom = bn.welford(xd)
    return [_host(a) for a in (y, m, s, rm, rv, fused, ev, dx, dw, db, mom.mean, mom.m2)]


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
    np.testing.assert_allclose(y.astype(np.float64), oracle.forward(x)[0], atol=2e-2)


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


FAMILY_CASES = [  # (function, shape): warp/partial-block/block per row, split rows, layouts
    ("layer", (64, 96)), ("layer", (32, 768)), ("layer", (8, 4096)), ("layer", (3, 40000)),
    ("layer", (5, 7, 11)), ("group-cf", (4, 8, 14, 14)), ("group-cf", (2, 4, 70000)),
    ("group-cl", (4, 9, 9, 16)), ("instance-cl", (3, 5, 7, 6)), ("instance-cf", (2, 6, 7, 9)),
]


def _family(name, x, dy, w, b):
    axis = -1 if name.endswith("-cl") else 1
    if name == "layer":
        y, m, s = bn.layer_norm_forward(x, x.shape[-1], w, b)
        return (y, m, s, *bn.layer_norm_backward(dy, x, x.shape[-1], m, s, w))
    if name.startswith("group"):
        y, m, s = bn.group_norm_forward(x, 2, w, b, axis=axis)
        return (y, m, s, *bn.group_norm_backward(dy, x, 2, m, s, w, axis=axis))
    y, m, s = bn.instance_norm_forward(x, None, None, w, b, axis=axis)
    return (y, m, s, *bn.instance_norm_backward(dy, x, m, s, w, axis=axis))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("name, shape", FAMILY_CASES)
@pytest.mark.parametrize("index64", [False, True])
def test_normalization_family_paths_agree_with_numpy(xp, monkeypatch, name, shape, dtype,
                                                      index64):
    if index64:
        if not EMULATED:
            pytest.skip("the index type is forced on the CPU execution target only")
        monkeypatch.setattr(cupy_backend, "_INDEX64_FROM", 0)
    c = shape[-1] if name in ("layer",) or name.endswith("-cl") else shape[1]
    acc = np.float64 if dtype == np.float64 else np.float32
    x = _data(shape, dtype, seed=11, offset=3.0)
    dy = _data(shape, dtype, seed=12, offset=0.0)
    w = np.random.default_rng(13).uniform(0.5, 2, c).astype(acc)
    b = np.random.default_rng(14).standard_normal(c).astype(acc)
    got = _family(name, xp.asarray(x), xp.asarray(dy), xp.asarray(w), xp.asarray(b))
    with bn.use_backend("numpy"):
        ref = _family(name, x, dy, w, b)
    rtol, atol = TOL[dtype]
    groups = max(1, x.size // c)
    for label, a, r, scale in zip(("y", "mean", "rstd", "dx", "dw", "db"), got, ref,
                                  (8, 8, 8, 16, groups * 8, groups * 4), strict=True):
        np.testing.assert_allclose(_host(a).astype(np.float64), r.astype(np.float64),
                                   rtol=rtol, atol=atol * scale, err_msg=label)

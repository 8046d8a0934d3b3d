"""GPU-only checks of the CUDA kernels (skipped, and reported as skipped, without a device).

Runs with only CuPy, NumPy, Hypothesis and pytest (no network, no extra installs).
"""

from __future__ import annotations

import numpy as np
import pytest

import bncupy as bn
from tests import oracle
from tests.conftest import requires_gpu

pytestmark = [requires_gpu, pytest.mark.gpu]


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


def _cases(cp):
    rng = np.random.default_rng(0)
    for shape, dtype in [((32, 64, 28, 28), np.float32), ((8, 16, 7, 7), np.float16),
                         ((5, 7, 33), np.float64), ((64, 300), np.float32),
                         ((3, 5, 6, 7, 8), np.float16)]:
        x = (rng.standard_normal(shape) * 2 + 5).astype(dtype)
        yield x, cp.asarray(x)


def test_agrees_with_numpy_reference_forward_and_backward(cp):
    for x, xg in _cases(cp):
        c = x.shape[1]
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        rmg, rvg = cp.asarray(rm), cp.asarray(rv)
        y, m, s = bn.batch_norm_forward(x, rm, rv, None, None, True)
        yg, mg, sg = bn.batch_norm_forward(xg, rmg, rvg, None, None, True)
        tol = 1e-2 if x.dtype == np.float16 else 1e-5
        np.testing.assert_allclose(cp.asnumpy(yg).astype(np.float64), y, atol=tol)
        np.testing.assert_allclose(cp.asnumpy(mg), m, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cp.asnumpy(rmg), rm, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cp.asnumpy(rvg), rv, rtol=1e-4)
        dy = np.random.default_rng(1).standard_normal(x.shape).astype(x.dtype)
        dx, dw, db = bn.batch_norm_backward(dy, x, None, m, s)
        dxg, dwg, dbg = bn.batch_norm_backward(cp.asarray(dy), xg, None, mg, sg)
        np.testing.assert_allclose(cp.asnumpy(dxg).astype(np.float64), dx, atol=tol * 4)
        np.testing.assert_allclose(cp.asnumpy(dbg), db, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(cp.asnumpy(dwg), dw, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_huge_means_keep_precision(cp, offset):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, 8, 32, 32)) + rng.uniform(-offset, offset, (1, 8, 1, 1)))
    x = x.astype(np.float32)
    truth = x.astype(np.float64).var(axis=(0, 2, 3))
    _, var = bn.moments(cp.asarray(x))
    assert np.abs(cp.asnumpy(var) / truth - 1).max() <= 1e-5


def test_float16_near_its_largest_values(cp):
    rng = np.random.default_rng(3)
    x = (6.0e4 + rng.standard_normal((16, 4, 16, 16)) * 256).clip(-65504, 65504).astype(np.float16)
    yg = bn.batch_norm(cp.asarray(x), None, None, training=True)
    assert cp.isfinite(yg).all()
    np.testing.assert_allclose(cp.asnumpy(yg).astype(np.float64), oracle.forward(x)[0], atol=2e-2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_propagate_to_their_channel_only(cp, bad):
    x = np.random.default_rng(4).standard_normal((4, 3, 8, 8)).astype(np.float32)
    x[2, 1, 3, 3] = bad
    y = cp.asnumpy(bn.batch_norm(cp.asarray(x), None, None, training=True))
    ref = bn.batch_norm(x, None, None, training=True)
    assert np.isnan(y[:, 1]).all() and np.isnan(ref[:, 1]).all()
    assert np.isfinite(y[:, [0, 2]]).all()


def test_more_than_2_31_elements(cp):
    shape = (2, 4, 2**28 + 16)  # 2**31 + 128 float16 values, 4.3 GB
    rng = cp.random.default_rng(5)
    x = (rng.standard_normal(shape, dtype=cp.float32) + cp.arange(4, dtype=cp.float32)[:, None])
    x = x.astype(cp.float16)
    assert x.size > 2**31
    mean, var = bn.moments(x)
    y = bn.batch_norm(x, None, None, training=True)
    for c in range(4):
        xc = x[:, c].astype(cp.float64)
        np.testing.assert_allclose(float(mean[c]), float(xc.mean()), atol=1e-4)
        np.testing.assert_allclose(float(var[c]), float(xc.var()), rtol=1e-4)
        del xc
        tail = y[1, c, -1000:].astype(cp.float64)
        expected = (x[1, c, -1000:].astype(cp.float64) - float(mean[c])) / np.sqrt(float(var[c]) + 1e-5)
        np.testing.assert_allclose(cp.asnumpy(tail), cp.asnumpy(expected), atol=2e-2)


def test_non_default_stream(cp):
    x = cp.random.default_rng(6).standard_normal((16, 32, 20, 20), dtype=cp.float32)
    expected = bn.batch_norm(x, None, None, training=True)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        rm, rv = cp.zeros(32, cp.float32), cp.ones(32, cp.float32)
        y = bn.batch_norm(x, rm, rv, training=True)
        dx, _, _ = bn.batch_norm_backward(y, x, None, *bn.batch_norm_forward(x, None, None,
                                                                             training=True)[1:])
    stream.synchronize()
    cp.testing.assert_array_equal(y, expected)
    assert bool(cp.isfinite(dx).all()) and bool((rm != 0).any())


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape, axis", [((32, 64, 28, 28), 1), ((32, 28, 28, 64), -1),
                                         ((4096, 300), 1)])
def test_bitwise_deterministic_over_ten_calls(cp, dtype, shape, axis):
    x = cp.random.default_rng(7).standard_normal(shape).astype(dtype)
    dy = cp.random.default_rng(8).standard_normal(x.shape).astype(dtype)
    z = cp.random.default_rng(9).standard_normal(x.shape).astype(dtype)
    first = None
    for _ in range(10):
        y, m, s = bn.batch_norm_forward(x, None, None, None, None, True, axis=axis)
        fused = bn.batch_norm(x, None, None, training=True, axis=axis, activation="relu",
                              residual=z)
        outs = [y, m, s, fused, *bn.batch_norm_backward(dy, x, None, m, s, axis=axis)]
        outs = [cp.asnumpy(o) for o in outs]
        if first is None:
            first = outs
        for a, b in zip(first, outs, strict=False):
            np.testing.assert_array_equal(a, b)


def test_no_memory_pool_growth_over_1000_calls(cp):
    pool = cp.get_default_memory_pool()
    layer = bn.BatchNorm2d(64)
    x = cp.random.default_rng(9).standard_normal((8, 64, 14, 14), dtype=cp.float32)
    for _ in range(5):
        layer.backward(layer(x))
    cp.cuda.Device().synchronize()
    before = pool.total_bytes()
    for _ in range(1000):
        layer.backward(layer(x))
    cp.cuda.Device().synchronize()
    assert pool.total_bytes() <= before


def test_nccl_exchange_and_sync_layer_world_of_one(cp):
    try:
        from cupyx.distributed import init_process_group

        comm = init_process_group(1, 0)
    except Exception as exc:  # NCCL or its Python bindings missing
        pytest.skip(f"NCCL unavailable: {exc}")
    from bncupy._comm import NCCLComm

    vec = cp.arange(7, dtype=cp.float64)
    cp.testing.assert_array_equal(NCCLComm(comm).exchange(vec), vec[None])
    x = cp.random.default_rng(1).standard_normal((6, 3, 4), dtype=cp.float32)
    layer, plain = bn.SyncBatchNorm(3, comm=comm), bn.BatchNorm1d(3)
    cp.testing.assert_allclose(layer(x), plain(x), atol=1e-6)

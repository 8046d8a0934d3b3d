"""Checks that need a real GPU (skipped, and reported as skipped, without one; failed instead in
the tox env ``gpu``, ``BNCUPY_REQUIRE=gpu``): a tensor past 2^31 elements, CuPy's memory pool,
NCCL (skipped where CuPy was built without it; any error fails). Everything else about the kernels is in
tests/test_kernels.py, which also runs on the CPU execution target.

Runs with only CuPy, NumPy, Hypothesis and pytest (no network, no extra installs).
"""

from __future__ import annotations

import numpy as np
import pytest

import bncupy as bn
from tests.conftest import requirement, requires_real_gpu

pytestmark = [requires_real_gpu, pytest.mark.gpu]


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


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
    from cupy.cuda import nccl

    if not nccl.available:
        requirement("nccl", "CuPy was built without NCCL (cupy.cuda.nccl.available is False)")
    from cupyx.distributed import init_process_group

    from bncupy._comm import NCCLComm

    comm = init_process_group(1, 0)

    vec = cp.arange(7, dtype=cp.float64)
    cp.testing.assert_array_equal(NCCLComm(comm).exchange(vec), vec[None])
    x = cp.random.default_rng(1).standard_normal((6, 3, 4), dtype=cp.float32)
    layer, plain = bn.SyncBatchNorm(3, comm=comm), bn.BatchNorm1d(3)
    cp.testing.assert_allclose(layer(x), plain(x), atol=1e-6)

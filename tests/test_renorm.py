"""Batch Renormalization against an independent float64 implementation of Chainer's
``batch_renormalization`` semantics, and ghost batch norm against batch norm per virtual batch,
on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bncupy as bn
from tests import oracle
from tests.test_properties import TOL, cases, close, make


@given(case=cases(min_count=2), rmax=st.sampled_from([1.0, 1.2, 3.0]),
       dmax=st.sampled_from([0.0, 0.3, 5.0]), shift=st.sampled_from([0.0, 2.0]))
def test_renorm_matches_chainer_semantics(backend, case, rmax, dmax, shift):
    x = make(case)
    dy = make({**case, "offset": 0.0, "scale": 1.0}, seed_shift=7)
    axis, c = case["axis"], case["shape"][case["axis"]]
    pd = np.float64 if case["dtype"] == np.float64 else np.float32
    rng = np.random.default_rng(case["seed"] + 1)
    w, b = rng.uniform(0.5, 2, c).astype(pd), rng.standard_normal(c).astype(pd)
    rm0 = (rng.standard_normal(c) * shift + case["offset"] * 0.5).astype(pd)
    rv0 = rng.uniform(0.3, 3.0, c).astype(pd)
    rm, rv = backend.asarray(rm0.copy()), backend.asarray(rv0.copy())
    y, mean, invstd, r, d = bn.batch_renorm_forward(
        backend.asarray(x), rm, rv, backend.asarray(w), backend.asarray(b), True, 0.1, 1e-5,
        rmax=rmax, dmax=dmax, axis=axis)
    ref = oracle.batch_renorm(x, dy, axis, w, b, rm0, rv0, 1e-5, rmax, dmax, 0.1)
    ref_y, ref_r, ref_d, ref_rm, ref_rv, ref_dx, ref_dw, ref_db = ref
    dtype = case["dtype"]
    count = x.size // c
    close(backend.to_numpy(y), ref_y, dtype, scale=8 * (1 + dmax))
    np.testing.assert_allclose(backend.to_numpy(r), ref_r, rtol=TOL[dtype][0] * 10, atol=1e-6)
    np.testing.assert_allclose(backend.to_numpy(d), ref_d, rtol=TOL[dtype][0] * 10,
                               atol=TOL[dtype][1] * (1 + case["offset"]))
    np.testing.assert_allclose(backend.to_numpy(rm), ref_rm, rtol=1e-5,
                               atol=1e-5 * (1 + case["offset"]))
    np.testing.assert_allclose(backend.to_numpy(rv), ref_rv,
                               rtol=1e-3 if dtype == np.float16 else 1e-5, atol=1e-5)
    dx, dw, db = bn.batch_renorm_backward(backend.asarray(dy), backend.asarray(x),
                                          backend.asarray(w), mean, invstd, r, d, axis=axis)
    close(backend.to_numpy(dx), ref_dx, dtype, scale=16 * rmax)
    close(backend.to_numpy(db), ref_db, dtype, scale=count)
    close(backend.to_numpy(dw), ref_dw, dtype, scale=count * 8 * (1 + dmax))


def test_renorm_with_rmax_1_dmax_0_is_batch_norm(backend):
    x = backend.asarray(np.random.default_rng(0).standard_normal((16, 4, 5, 5)) * 3 + 1)
    a = bn.BatchNorm2d(4, renorm=True, rmax=1.0, dmax=0.0, dtype=np.float64)
    plain = bn.BatchNorm2d(4, dtype=np.float64)
    for _ in range(3):
        np.testing.assert_allclose(backend.to_numpy(a(x)), backend.to_numpy(plain(x)),
                                   atol=1e-12)
        dy = x * 0.5 - 1
        np.testing.assert_allclose(backend.to_numpy(a.backward(dy)),
                                   backend.to_numpy(plain.backward(dy)), atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(a.running_var),
                               backend.to_numpy(plain.running_var), rtol=1e-12)
    assert int(a.num_batches_tracked) == 3


def test_renorm_layer_over_steps_and_eval(backend):
    rng = np.random.default_rng(3)
    layer = bn.BatchNorm1d(3, renorm=True, rmax=2.0, dmax=1.0, dtype=np.float64)
    rm, rv = np.zeros(3), np.ones(3)
    for step in range(4):
        x = rng.standard_normal((12, 3)) * (step + 1) + step
        dy = rng.standard_normal(x.shape)
        y = backend.to_numpy(layer(backend.asarray(x)))
        dx = backend.to_numpy(layer.backward(backend.asarray(dy)))
        ref = oracle.batch_renorm(x, dy, 1, np.ones(3), np.zeros(3), rm, rv, 1e-5, 2.0, 1.0,
                                  0.1)
        np.testing.assert_allclose(y, ref[0], atol=1e-10)
        np.testing.assert_allclose(dx, ref[5], atol=1e-10)
        np.testing.assert_allclose(backend.to_numpy(layer.grad_weight), ref[6], atol=1e-9)
        rm, rv = ref[3], ref[4]
    np.testing.assert_allclose(backend.to_numpy(layer.running_mean), rm, atol=1e-12)
    layer.eval()
    x = rng.standard_normal((5, 3))
    np.testing.assert_allclose(backend.to_numpy(layer(backend.asarray(x))),
                               oracle.forward(x, 1, None, None, 1e-5, False, rm, rv)[0],
                               atol=1e-10)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
@pytest.mark.parametrize("renorm", [False, True])
def test_ghost_batches_are_batch_norm_per_virtual_batch(backend, size, renorm):
    rng = np.random.default_rng(size)
    x = rng.standard_normal((10, 3, 4)) * 2 + 1
    dy = rng.standard_normal(x.shape)  # size 1: one sample of 4 values per channel is a batch
    layer = bn.BatchNorm1d(3, dtype=np.float64, ghost_batch_size=size, renorm=renorm,
                           rmax=1.5, dmax=0.5)
    y = backend.to_numpy(layer(backend.asarray(x)))
    dx = backend.to_numpy(layer.backward(backend.asarray(dy)))
    rm, rv = np.zeros(3), np.ones(3)
    ref_y, ref_dx, ref_dw = [], [], np.zeros(3)
    for start in range(0, 10, size):
        part = slice(start, start + size)
        if renorm:
            out = oracle.batch_renorm(x[part], dy[part], 1, np.ones(3), np.zeros(3), rm, rv,
                                      1e-5, 1.5, 0.5, 0.1)
            ref_y.append(out[0])
            ref_dx.append(out[5])
            ref_dw += out[6]
            rm, rv = out[3], out[4]
        else:
            yy, _, _, rm, rv = oracle.forward(x[part], 1, None, None, 1e-5, True, rm, rv, 0.1)
            ref_y.append(yy)
            dxx, dww, _ = oracle.backward(dy[part], x[part], 1)
            ref_dx.append(dxx)
            ref_dw += dww
    np.testing.assert_allclose(y, np.concatenate(ref_y), atol=1e-10)
    np.testing.assert_allclose(dx, np.concatenate(ref_dx), atol=1e-9)
    np.testing.assert_allclose(backend.to_numpy(layer.grad_weight), ref_dw, atol=1e-9)
    np.testing.assert_allclose(backend.to_numpy(layer.running_var), rv, rtol=1e-12)
    assert int(layer.num_batches_tracked) == -(-10 // size)
    assert "ghost_batch_size" in repr(layer)

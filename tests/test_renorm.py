"""Batch Renormalization against an independent float64 implementation of Chainer's
``batch_renormalization`` semantics, and ghost batch norm against batch norm per virtual batch,
on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import bncupy as bn
from tests import agreement, oracle
from tests.test_properties import cases, make, put, representable


@given(case=cases(min_count=2), rmax=st.sampled_from([1.0, 1.2, 3.0]),
       dmax=st.sampled_from([0.0, 0.3, 5.0]))
def test_renorm_matches_chainer_semantics(backend, case, rmax, dmax):
    """Forward (output, r, d, running statistics) and backward, against the float64 oracle of
    Chainer's semantics, running statistics clipping r and d on some channels only."""
    x = make(case)
    assume(representable(case, x))
    agreement.batch_renorm(backend.xp, x, case["axis"], seed=case["seed"] + 1, rmax=rmax,
                           dmax=dmax, put=put(case, backend))


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

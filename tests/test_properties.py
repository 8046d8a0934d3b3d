"""Property tests: every backend against the float64 oracle, and invariants of batch norm."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import bncupy as bn
from tests import oracle

DTYPES = [np.float16, np.float32, np.float64]
# (rtol, atol) on outputs of order 1, per input dtype.
TOL = {np.float16: (1e-2, 1e-2), np.float32: (1e-4, 1e-4), np.float64: (1e-10, 1e-10)}


@st.composite
def cases(draw, min_count: int = 2):
    ndim = draw(st.integers(2, 5))
    shape = [draw(st.integers(1, 6)), draw(st.integers(1, 5))]
    shape += [draw(st.integers(1, 5)) for _ in range(ndim - 2)]
    channels_last = draw(st.booleans())
    if channels_last:  # (N, C, *S) drawn, laid out as (N, *S, C)
        shape = [shape[0], *shape[2:], shape[1]]
    axis = -1 if channels_last else 1
    count = int(np.prod(shape)) // shape[axis]
    assume(count >= min_count)
    return {
        "shape": tuple(shape),
        "axis": axis,
        "dtype": draw(st.sampled_from(DTYPES)),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "noncontiguous": draw(st.booleans()),
        "offset": draw(st.sampled_from([0.0, 3.0, 50.0])),
        "scale": draw(st.sampled_from([0.5, 1.0, 4.0])),
    }


def make(case: dict, seed_shift: int = 0) -> np.ndarray:
    """Input of the case's shape with per-channel offsets; a strided view if non-contiguous."""
    rng = np.random.default_rng(case["seed"] + seed_shift)
    shape, axis = case["shape"], case["axis"]
    bshape = [1] * len(shape)
    bshape[axis] = shape[axis]
    offsets = rng.uniform(-case["offset"], case["offset"], shape[axis]).reshape(bshape)
    x = (rng.standard_normal(shape) * case["scale"] + offsets).astype(case["dtype"])
    if case["noncontiguous"]:
        buf = np.zeros((*shape[:-1], 2 * shape[-1]), x.dtype)
        buf[..., ::2] = x
        x = buf[..., ::2]
    return x


def params(case: dict, backend, dtype=None):
    """weight, bias, running_mean, running_var: float64 for float64 input, else float32."""
    dtype = dtype or (np.float64 if case["dtype"] == np.float64 else np.float32)
    rng = np.random.default_rng(case["seed"] + 1)
    c = case["shape"][case["axis"]]
    w = rng.uniform(0.5, 2.0, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm = rng.standard_normal(c).astype(dtype)
    rv = rng.uniform(0.5, 2.0, c).astype(dtype)
    return [backend.asarray(a) for a in (w, b, rm, rv)]


def close(actual, expected, dtype, scale=1.0):
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol,
                               atol=atol * scale)


@given(case=cases())
def test_training_forward_matches_oracle(backend, case):
    x = make(case)
    w, b, rm, rv = params(case, backend)
    rm0, rv0 = backend.to_numpy(rm).copy(), backend.to_numpy(rv).copy()
    x_before = x.copy()
    y, save_mean, save_invstd = bn.batch_norm_forward(backend.asarray(x), rm, rv, w, b, True,
                                                      0.1, 1e-5, axis=case["axis"])
    ref_y, ref_mean, ref_invstd, ref_rm, ref_rv = oracle.forward(
        x, case["axis"], backend.to_numpy(w), backend.to_numpy(b), 1e-5, True, rm0, rv0, 0.1)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert type(y) is type(backend.asarray(x))
    close(backend.to_numpy(y), ref_y, case["dtype"], scale=4)
    close(backend.to_numpy(save_mean), ref_mean, case["dtype"], scale=1 + case["offset"])
    close(backend.to_numpy(save_invstd), ref_invstd, case["dtype"], scale=4)
    np.testing.assert_allclose(backend.to_numpy(rm), ref_rm, rtol=1e-5, atol=1e-5 * (1 + case["offset"]))
    np.testing.assert_allclose(backend.to_numpy(rv), ref_rv, rtol=1e-3 if case["dtype"] == np.float16
                               else 1e-5, atol=1e-5)
    np.testing.assert_array_equal(x, x_before)  # input untouched


@given(case=cases(min_count=1))
def test_eval_forward_matches_oracle(backend, case):
    x = make(case)
    w, b, rm, rv = params(case, backend)
    rm0, rv0 = backend.to_numpy(rm).copy(), backend.to_numpy(rv).copy()
    y = bn.batch_norm(backend.asarray(x), rm, rv, w, b, False, axis=case["axis"])
    ref_y = oracle.forward(x, case["axis"], backend.to_numpy(w), backend.to_numpy(b), 1e-5, False,
                           rm0, rv0)[0]
    close(backend.to_numpy(y), ref_y, case["dtype"], scale=4 + case["offset"])
    np.testing.assert_array_equal(backend.to_numpy(rm), rm0)  # eval never updates
    np.testing.assert_array_equal(backend.to_numpy(rv), rv0)


@given(case=cases(min_count=4))
def test_normalized_output_has_zero_mean_unit_variance(backend, case):
    x = make(case)
    y = backend.to_numpy(bn.batch_norm(backend.asarray(x), None, None, training=True, eps=1e-12,
                                       axis=case["axis"])).astype(np.float64)
    x64 = x.astype(np.float64)
    axes = tuple(i for i in range(x.ndim) if i != case["axis"] % x.ndim)
    varying = x64.std(axis=axes) > 1e-3 * (1 + np.abs(x64).max(axis=axes))
    atol = {np.float16: 2e-2, np.float32: 1e-4, np.float64: 1e-9}[case["dtype"]]
    np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=atol)
    np.testing.assert_allclose(y.var(axis=axes)[varying], 1.0, atol=5 * atol)


@given(case=cases(min_count=4), data=st.data())
def test_invariant_to_positive_per_channel_affine_map(backend, case, data):
    case = {**case, "dtype": np.float64}
    x = make(case)
    c = case["shape"][case["axis"]]
    a = np.asarray(data.draw(st.lists(st.floats(0.1, 10), min_size=c, max_size=c)))
    s = np.asarray(data.draw(st.lists(st.floats(-100, 100), min_size=c, max_size=c)))
    bshape = [1] * x.ndim
    bshape[case["axis"]] = c
    x2 = x * a.reshape(bshape) + s.reshape(bshape)
    kwargs = {"training": True, "eps": 1e-300, "axis": case["axis"]}
    y1 = backend.to_numpy(bn.batch_norm(backend.asarray(x), None, None, **kwargs))
    y2 = backend.to_numpy(bn.batch_norm(backend.asarray(x2), None, None, **kwargs))
    np.testing.assert_allclose(y1, y2, atol=1e-7)


@given(case=cases(), data=st.data())
def test_invariant_to_permuting_the_batch(backend, case, data):
    x = make(case)
    perm = np.asarray(data.draw(st.permutations(range(x.shape[0]))))
    kwargs = {"training": True, "axis": case["axis"]}
    y = backend.to_numpy(bn.batch_norm(backend.asarray(x), None, None, **kwargs))
    yp = backend.to_numpy(bn.batch_norm(backend.asarray(x[perm]), None, None, **kwargs))
    close(yp, y[perm].astype(np.float64), case["dtype"], scale=2)


@given(case=cases(min_count=1), data=st.data())
def test_welford_merge_equals_whole_for_any_split(backend, case, data):
    case = {**case, "dtype": data.draw(st.sampled_from([np.float32, np.float64]))}
    x = make(case)
    n = x.shape[0]
    cut = data.draw(st.integers(0, n))
    whole = bn.welford(backend.asarray(x), axis=case["axis"])
    merged = bn.welford(backend.asarray(x[:cut]), axis=case["axis"]).merge(
        bn.welford(backend.asarray(x[cut:]), axis=case["axis"]))
    assert merged.count == whole.count == x.size // x.shape[case["axis"]]
    rtol = 1e-4 if case["dtype"] == np.float32 else 1e-10
    np.testing.assert_allclose(backend.to_numpy(merged.mean), backend.to_numpy(whole.mean),
                               rtol=rtol, atol=rtol * (1 + case["offset"]))
    np.testing.assert_allclose(backend.to_numpy(merged.var()), backend.to_numpy(whole.var()),
                               rtol=rtol * 10, atol=rtol)
    mean, var = bn.moments(backend.asarray(x), axis=case["axis"])
    np.testing.assert_allclose(backend.to_numpy(var), backend.to_numpy(whole.var(0)), rtol=1e-12)
    x64 = x.astype(np.float64)
    axes = tuple(i for i in range(x.ndim) if i != case["axis"] % x.ndim)
    unbiased = backend.to_numpy(whole.var(ddof=1))
    if whole.count > 1:
        np.testing.assert_allclose(unbiased, x64.var(axis=axes, ddof=1), rtol=rtol * 10,
                                   atol=rtol)
    else:
        assert np.isnan(unbiased).all()


@given(case=cases(), training=st.booleans())
def test_backward_matches_oracle(backend, case, training):
    x = make(case)
    dy = make({**case, "offset": 0.0, "scale": 1.0}, seed_shift=7)
    w, b, rm, rv = params(case, backend)
    y, save_mean, save_invstd = bn.batch_norm_forward(
        backend.asarray(x), rm, rv, w, b, training, axis=case["axis"])
    rm_np, rv_np = backend.to_numpy(rm), backend.to_numpy(rv)
    dx, dw, db = bn.batch_norm_backward(backend.asarray(dy), backend.asarray(x), w, save_mean,
                                        save_invstd, training=training, axis=case["axis"])
    ref_dx, ref_dw, ref_db = oracle.backward(dy, x, case["axis"], backend.to_numpy(w), 1e-5,
                                             training, rm_np, rv_np)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    count = x.size // x.shape[case["axis"]]
    close(backend.to_numpy(dx), ref_dx, case["dtype"], scale=8)
    close(backend.to_numpy(db), ref_db, case["dtype"], scale=count)
    close(backend.to_numpy(dw), ref_dw, case["dtype"], scale=count * 4)


@given(case=cases())
def test_backward_matches_finite_differences_in_float64(backend, case):
    case = {**case, "dtype": np.float64}
    x = make(case)
    rng = np.random.default_rng(case["seed"] + 3)
    probe = rng.standard_normal(x.shape)
    w, b, _, _ = params(case, backend, np.float64)
    kwargs = {"training": True, "axis": case["axis"]}

    def loss(xv, wv, bv):
        y = bn.batch_norm(backend.asarray(xv), None, None, wv, bv, **kwargs)
        return float((backend.to_numpy(y) * probe).sum())

    y, mean, invstd = bn.batch_norm_forward(backend.asarray(x), None, None, w, b, **kwargs)
    dx, dw, db = bn.batch_norm_backward(backend.asarray(probe), backend.asarray(x), w, mean,
                                        invstd, training=True, axis=case["axis"])
    h = 1e-6
    direction = rng.standard_normal(x.shape)
    numeric = (loss(x + h * direction, w, b) - loss(x - h * direction, w, b)) / (2 * h)
    analytic = float((backend.to_numpy(dx) * direction).sum())
    assert numeric == pytest.approx(analytic, rel=1e-4, abs=1e-5)
    dw_np = backend.to_numpy(dw)
    c = case["shape"][case["axis"]]
    for ch in range(min(c, 3)):
        e = np.zeros(c)
        e[ch] = h
        wp, wm = backend.asarray(backend.to_numpy(w) + e), backend.asarray(backend.to_numpy(w) - e)
        assert (loss(x, wp, b) - loss(x, wm, b)) / (2 * h) == pytest.approx(dw_np[ch], rel=1e-4,
                                                                             abs=1e-5)


@given(case=cases(), momentum=st.one_of(st.none(), st.floats(0.0, 1.0)), steps=st.integers(1, 4))
def test_layer_running_stats_over_several_steps(backend, case, momentum, steps):
    case = {**case, "dtype": np.float64}
    layer_cls = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d, 5: bn.BatchNorm3d}
    c = case["shape"][case["axis"]]
    layer = layer_cls[len(case["shape"])](c, momentum=momentum, dtype=np.float64,
                                          channels_last=case["axis"] == -1)
    rm, rv = np.zeros(c), np.ones(c)
    for step in range(steps):
        x = make(case, seed_shift=step)
        layer(backend.asarray(x))
        factor = 1.0 / (step + 1) if momentum is None else momentum
        _, _, _, rm, rv = oracle.forward(x, case["axis"], None, None, 1e-5, True, rm, rv, factor)
    np.testing.assert_allclose(backend.to_numpy(layer.running_mean), rm, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(backend.to_numpy(layer.running_var), rv, rtol=1e-10, atol=1e-10)
    assert int(layer.num_batches_tracked) == steps
    layer.eval()
    x = make(case, seed_shift=99)
    ref = oracle.forward(x, case["axis"], None, None, 1e-5, False, rm, rv)[0]
    np.testing.assert_allclose(backend.to_numpy(layer(backend.asarray(x))), ref, rtol=1e-9,
                               atol=1e-9)


@pytest.mark.parametrize("offset", [1e3, 1e5, 1e6])
def test_float32_huge_means_keep_variance_precision(backend, offset):
    rng = np.random.default_rng(1)
    c = 6
    offsets = rng.uniform(-offset, offset, c).reshape(1, c, 1, 1)
    x = (rng.standard_normal((16, c, 24, 24)) + offsets).astype(np.float32)
    truth = x.astype(np.float64).var(axis=(0, 2, 3))
    _, var = bn.moments(backend.asarray(x))
    rel = np.abs(backend.to_numpy(var).astype(np.float64) / truth - 1)
    assert rel.max() <= 1e-5
    # Normalized output keeps full precision too.
    y = backend.to_numpy(bn.batch_norm(backend.asarray(x), None, None, training=True))
    ref = oracle.forward(x, 1, training=True)[0]
    np.testing.assert_allclose(y, ref, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("value", [0.0, 1.0, -37.25, 1e6, 6e4])
def test_constant_channels_give_exactly_beta(backend, dtype, axis, value):
    if dtype == np.float16 and abs(value) > 6e4:
        value = 6e4
    c = 3
    shape = (4, c, 5, 5) if axis == 1 else (4, 5, 5, c)
    x = np.full(shape, value, dtype)
    beta = np.array([0.5, -2.0, 3.25], np.float32)
    gamma = np.array([1.5, 2.0, -1.0], np.float32)
    y = bn.batch_norm(backend.asarray(x), None, None, backend.asarray(gamma),
                      backend.asarray(beta), training=True, axis=axis)
    expected = np.broadcast_to(beta.reshape((1, c, 1, 1) if axis == 1 else (1, 1, 1, c)), shape)
    np.testing.assert_array_equal(backend.to_numpy(y), expected.astype(dtype))


def test_tiles_cover_every_element_exactly_once():
    from bncupy.backends import numpy as nb

    for shape in [(1, 1, 10**6), (3, 5000, 1), (7, 3, 9000), (2, 2**19, 1), (1000, 64, 49),
                  (4, 64, 3136), (2, 3, 300000)]:
        seen = np.zeros(shape, np.int8)
        for tile in nb._tiles(shape):
            seen[tile] += 1
        assert (seen == 1).all(), shape

"""Property tests: every backend against the float64 oracle, and invariants of batch norm.

The drawn inputs reach every memory layout the API takes (contiguous, channels-last memory for
channel axis 1 and the reverse, reversed, transposed, offset and strided views), empty batches,
parameters of any float dtype and per-channel means up to 1e6; every comparison is within
:mod:`tests.tolerances`' bounds. The engines' large-input paths are in :mod:`tests.test_scale`.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import bncupy as bn
from tests import agreement, oracle
from tests.tolerances import C_ELEMENT, Bounds, channels, check, compute_dtype, unit

DTYPES = [np.float16, np.float32, np.float64]
OFFSETS = [0.0, 3.0, 50.0, 1e3, 1e4, 1e6]  # float16 data stop at 1e3 (its largest is 65504)


@st.composite
def cases(draw, min_count: int = 2, empty: bool = False):
    """An input's shape, channel axis, dtype, memory layout, data and parameter dtypes.

    ``min_count``: the fewest values per channel; ``empty``: a batch of 0 samples may be drawn
    as well."""
    ndim = draw(st.integers(2, 5))
    shape = [draw(st.integers(0 if empty else 1, 8)), draw(st.integers(1, 5))]
    shape += [draw(st.integers(1, 5)) for _ in range(ndim - 2)]
    channels_last = draw(st.booleans())
    if channels_last:  # (N, C, *S) drawn, laid out as (N, *S, C)
        shape = [shape[0], *shape[2:], shape[1]]
    axis = -1 if channels_last else 1
    count = int(np.prod(shape)) // shape[axis]
    assume(count >= min_count or count == 0)
    dtype = draw(st.sampled_from(DTYPES))
    offsets = OFFSETS[:4] if dtype == np.float16 else OFFSETS
    return {
        "shape": tuple(shape),
        "axis": axis,
        "dtype": dtype,
        "seed": draw(st.integers(0, 2**32 - 1)),
        "layout": draw(st.sampled_from(agreement.LAYOUTS)),
        "offset": draw(st.sampled_from(offsets)),
        "scale": draw(st.sampled_from([0.5, 1.0, 4.0])),
        "params": draw(st.one_of(st.none(), st.tuples(*[st.sampled_from(DTYPES)] * 4))),
    }


def make(case: dict, seed_shift: int = 0) -> np.ndarray:
    """Host values of the case's shape and dtype, around per-channel means."""
    return agreement.data(case["shape"], case["dtype"], case["seed"] + seed_shift, case["axis"],
                          case["offset"], case["scale"])


def representable(case: dict, x: np.ndarray) -> bool:
    """Whether the statistics saved in the compute dtype hold each channel's mean to a 32nd of
    its sigma (or the channel is constant). Beyond that, the backward pass, given the saved
    mean, cannot be accurate (float32 values 1e6 apart from 0 and 0.06 from each other), nor
    can a merge of two partials: their bounds would be as wide as the results."""
    mean, var = oracle.moments(x, _axes(case))
    sigma = np.sqrt(var)
    return bool(np.all((sigma == 0) | (unit(compute_dtype(x.dtype)) * np.abs(mean) < sigma / 32)))


def put(case: dict, backend):
    """Makes arrays of ``backend``'s kind in the case's memory layout."""
    return lambda a: agreement.arrange(backend.xp, a, case["layout"], case["axis"])


@given(case=cases(min_count=1, empty=True))
def test_every_operation_matches_the_oracle(backend, case):
    """Training forward and backward, the statistics, eval with a fused ReLU and residual, and
    a fused layer (see :func:`tests.agreement.batch_norm`), on any layout; inputs untouched."""
    x = make(case)
    assume(case["shape"][0] == 0 or representable(case, x))
    if backend.name == "cupy" and case["params"]:  # a strict xfail in tests/test_kernels.py
        _, _, mean_dtype, var_dtype = case["params"]
        assume(mean_dtype != compute_dtype(case["dtype"]) or var_dtype == mean_dtype)
    before = x.copy()
    agreement.batch_norm(backend.xp, x, case["axis"], seed=case["seed"] + 1,
                         put=put(case, backend), dtypes=case["params"])
    np.testing.assert_array_equal(x, before)


def _axes(case: dict) -> tuple[int, ...]:
    ndim = len(case["shape"])
    return tuple(i for i in range(ndim) if i != case["axis"] % ndim)


@given(case=cases(min_count=4))
def test_normalized_output_has_zero_mean_unit_variance(backend, case):
    """Per channel, mean(y) is 0 and var(y) is var / (var + eps), up to y's bound."""
    x = make(case)
    eps = 1e-12
    y = backend.to_numpy(bn.batch_norm(put(case, backend)(x), None, None, training=True,
                                       eps=eps, axis=case["axis"])).astype(np.float64)
    bound = Bounds(channels(x, case["axis"]), x.dtype, eps=eps)
    widest = bound.y.max(axis=(0, 2, 3))
    _, var = oracle.moments(x, _axes(case))
    largest = np.abs(channels(y, case["axis"])).max(axis=(0, 2, 3))
    check(oracle.average(y, _axes(case)), np.zeros_like(var), widest, "mean(y)")
    check(oracle.moments(y, _axes(case))[1], var / (var + eps),
          2 * largest * widest + widest ** 2, "var(y)")


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
    eps = 1e-300
    kwargs = {"training": True, "eps": eps, "axis": case["axis"]}
    y1 = backend.to_numpy(bn.batch_norm(backend.asarray(x), None, None, **kwargs))
    y2 = backend.to_numpy(bn.batch_norm(backend.asarray(x2), None, None, **kwargs))
    view = (channels(x, case["axis"]), channels(x2, case["axis"]))
    bound = Bounds(view[0], x.dtype, eps=eps).y + Bounds(view[1], x.dtype, eps=eps).y
    check(channels(y1, case["axis"]), channels(y2, case["axis"]), bound, "y")


@given(case=cases(), data=st.data())
def test_invariant_to_permuting_the_batch(backend, case, data):
    x = make(case)
    perm = np.asarray(data.draw(st.permutations(range(x.shape[0]))))
    kwargs = {"training": True, "axis": case["axis"]}
    y = backend.to_numpy(bn.batch_norm(backend.asarray(x), None, None, **kwargs))
    yp = backend.to_numpy(bn.batch_norm(backend.asarray(x[perm]), None, None, **kwargs))
    bound = Bounds(channels(x[perm], case["axis"]), x.dtype).y
    check(channels(yp, case["axis"]), channels(y[perm], case["axis"]), 2 * bound, "y")


@given(case=cases(min_count=1), data=st.data())
def test_welford_merge_and_moments_match_the_oracle_for_any_split(backend, case, data):
    x = make(case)
    assume(representable(case, x))
    cut = data.draw(st.integers(0, x.shape[0]))
    arrange = put(case, backend)
    whole = bn.welford(arrange(x), axis=case["axis"])
    merged = bn.welford(arrange(x[:cut]), axis=case["axis"]).merge(
        bn.welford(arrange(x[cut:]), axis=case["axis"]))
    mean, var = bn.moments(arrange(x), axis=case["axis"])
    count = x.size // x.shape[case["axis"]]
    assert merged.count == whole.count == count
    ref_mean, ref_var = oracle.moments(x, _axes(case))
    bound = Bounds(channels(x, case["axis"]), x.dtype)
    bound_mean = bound.saved_mean.ravel()
    bound_var = (bound.d_var + bound.uc * bound.var).ravel()
    # A merge adds a rounding of each partial's statistics and of the merged ones, and its
    # difference of the partials' rounded means is off by uc * |mean|, times sigma in M2 / n.
    bound_merged = 3 * bound_var + (C_ELEMENT * bound.uc * np.abs(bound.mean)
                                    * np.sqrt(bound.var)).ravel()
    for name, moments, bounds in (("whole", whole, (bound_mean, bound_var)),
                                  ("merged", merged, (3 * bound_mean, bound_merged))):
        check(backend.to_numpy(moments.mean), ref_mean, bounds[0], f"{name} mean")
        check(backend.to_numpy(moments.var()), ref_var, bounds[1], f"{name} var")
        unbiased = backend.to_numpy(moments.var(ddof=1))
        if count > 1:
            check(unbiased, ref_var * count / (count - 1), bounds[1] * count / (count - 1),
                  f"{name} unbiased var")
        else:
            assert np.isnan(unbiased).all()
    check(backend.to_numpy(mean), ref_mean, bound_mean, "moments mean")
    check(backend.to_numpy(var), ref_var, bound_var, "moments var")


@given(case=cases())
def test_backward_matches_finite_differences_in_float64(backend, case):
    # central differences of step 1e-6 need data far above its ulp: offsets up to 50
    case = {**case, "dtype": np.float64, "offset": min(case["offset"], 50.0)}
    x = make(case)
    rng = np.random.default_rng(case["seed"] + 3)
    probe = rng.standard_normal(x.shape)
    w, b, _, _ = (backend.asarray(a) for a in agreement.parameters(
        case["shape"][case["axis"]], np.float64, rng))
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
    check(channels(y, 1), channels(oracle.forward(x, 1, training=True)[0], 1),
          Bounds(channels(x, 1), x.dtype).y, "y")


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

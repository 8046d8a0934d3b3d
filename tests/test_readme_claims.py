"""The README's numerical promises, on every backend, dtype and layout.

* "a constant channel maps to exactly β": training-mode output of a channel whose values are all
  equal is bitwise β (in the input's dtype), whatever the constant, eps, γ and β.
* "float32 data with a mean of 1e6 keeps its variance to a relative 1e-5": per-channel variance
  of float32 data against the float64 variance of the same values, for mean/std up to 1e5, in
  channel-first and channels-last layouts alike.

Both once failed on the NumPy backend (a folded apply ``x*scale + shift'`` that missed β by a
few ulps; channels-last sums over too many float32 rows); the backend's rewrite fixed both, and
these tests keep them fixed.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import bncupy as bn

DTYPES = [np.float16, np.float32, np.float64]
LAYOUTS = ["channel-first", "channels-last"]
CONSTANTS = [0.0, 1.0, -37.25, 1e6, 6e4, 0.1, 1 / 3]
# (eps, gamma, beta) per case: the folded apply path x * scale + (shift - center * scale) is
# taken when every |center * scale| <= 8, so small eps and large gamma keep it off, and a small
# |beta| next to |constant * scale| shows its rounding most.
SETTINGS = [(eps, gamma, beta) for eps in (1e-5, 1e-3, 1.0, 4.0) for gamma in (1.0, 0.01, 3.0)
            for beta in (0.75, -1e-3)]

def _param_dtype(dtype) -> type:
    return np.float64 if dtype == np.float64 else np.float32


def _constant_channel_output(backend, dtype, channels_last: bool, value: float, eps: float,
                             gamma: float, beta: float, seed: int = 0) -> tuple:
    """Training-mode output on channel 0 (all ``value``) next to a standard-normal channel 1,
    and the expected β in the input's dtype."""
    shape = (4, 3, 2) if channels_last else (4, 2, 3)
    axis = -1 if channels_last else 1
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    channel0 = (..., 0) if channels_last else (slice(None), 0)
    x[channel0] = dtype(value)
    pd = _param_dtype(dtype)
    weight, bias = np.array([gamma, 1.0], pd), np.array([beta, 0.0], pd)
    y = bn.batch_norm(backend.asarray(x), None, None, backend.asarray(weight),
                      backend.asarray(bias), training=True, eps=eps, axis=axis)
    return backend.to_numpy(y)[channel0], bias[:1].astype(dtype)


def _ulps(got: np.ndarray, expected: np.ndarray) -> float:
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    return float(np.max(diff / np.spacing(np.abs(expected)).astype(np.float64)))


# every constant that the dtype can hold (float16 cannot hold 1e6)
CONSTANT_CASES = [pytest.param(dtype, value, id=f"{dtype.__name__}-{value:g}")
                  for dtype in DTYPES for value in CONSTANTS if abs(value) <= float(np.finfo(dtype).max)]


@pytest.mark.parametrize("dtype, value", CONSTANT_CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=LAYOUTS)
def test_constant_channel_maps_to_exactly_beta(backend, dtype, channels_last, value):
    misses = []
    for eps, gamma, beta in SETTINGS:
        got, expected = _constant_channel_output(backend, dtype, channels_last, value, eps,
                                                 gamma, beta)
        if not np.array_equal(got, np.broadcast_to(expected, got.shape)):
            misses.append(f"eps={eps:g} gamma={gamma:g} beta={beta:g}: off by "
                          f"{_ulps(got, expected):.0f} ulps of beta")
    assert not misses, "; ".join(misses)


@given(dtype=st.sampled_from(DTYPES), channels_last=st.booleans(),
       value=st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False),
       eps=st.floats(1e-8, 10.0), gamma=st.floats(-10.0, 10.0), beta=st.floats(-100.0, 100.0),
       seed=st.integers(0, 2**16))
@example(dtype=np.float32, channels_last=False, value=1.0, eps=1.0, gamma=1.0, beta=-1e-3,
         seed=0)  # a case the folded apply used to miss
def test_random_constant_channel_maps_to_exactly_beta(backend, dtype, channels_last, value, eps,
                                                      gamma, beta, seed):
    pd = _param_dtype(dtype)
    beta = float(pd(beta).astype(dtype))  # a β the output dtype can hold
    got, expected = _constant_channel_output(backend, dtype, channels_last, value, eps,
                                             gamma, beta, seed)
    np.testing.assert_array_equal(got, np.broadcast_to(expected, got.shape))


VARIANCE_LAYOUTS = {  # name: (shape, channel axis); few channels: long channels-last rows
    "NCHW": ((32, 3, 56, 56), 1),
    "NCL": ((64, 4, 512), 1),
    "NHWC": ((32, 56, 56, 3), -1),
    "NLC": ((64, 512, 4), -1),
    "NDHWC": ((8, 8, 28, 28, 3), -1),
    "NC": ((100_000, 2), 1),  # a 2-D (N, C) batch has its channels innermost too
}
MEAN_STD = [(1e6, 100.0), (1e6, 10.0), (1e5, 10.0), (1e4, 1.0), (1.0, 1e-4)]


@pytest.mark.parametrize("mean, std", MEAN_STD, ids=[f"mean{m:g}-std{s:g}" for m, s in MEAN_STD])
@pytest.mark.parametrize("layout", list(VARIANCE_LAYOUTS))
def test_float32_variance_to_relative_1e_5_at_any_offset(backend, layout, mean, std):
    shape, axis = VARIANCE_LAYOUTS[layout]
    axes = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    worst = 0.0
    for seed in range(6):
        x = (np.random.default_rng(seed).standard_normal(shape) * std + mean).astype(np.float32)
        truth = x.astype(np.float64).var(axis=axes)
        _, var = bn.moments(backend.asarray(x), axis=axis)
        worst = max(worst, float(np.max(np.abs(backend.to_numpy(var) - truth) / truth)))
    assert worst <= 1e-5, f"relative variance error {worst:.2e} (6 seeds)"

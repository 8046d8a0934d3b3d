"""explorer.html's precomputed states: right numbers, every state present, a self-contained page.

The page only looks states up, so checking the states checks what a reader sees; the browser
test (test_explorer_browser.py) checks that the page shows them.
"""

from __future__ import annotations

import base64
import gzip
import json
import re

import numpy as np
import pytest

import bncupy as bn
from bncupy.demo import explorer as ex

EPS = 1e-5


@pytest.fixture(scope="module")
def states():
    return ex.compute(seed=0)


@pytest.fixture(scope="module")
def page(states):
    return ex.render(states, curves_png=b"\x89PNG fake", notes=["one", "caption <b>&</b>"])


def test_every_control_combination_has_a_state(states):
    n = ex.FEATURES * len(ex.KINDS) * len(ex.MEANS) * len(ex.SCALES)
    modes = 1 + len(ex.BATCHES_SEEN)
    assert states["input_rows"].shape == (n, ex.ROWS_SHOWN)
    assert states["normalized_stats"].shape == (modes, n, 3)
    assert states["output_rows"].shape == (modes, len(ex.GAMMAS), len(ex.BETAS), n, ex.ROWS_SHOWN)
    assert states["output_hist"].shape == (modes, len(ex.GAMMAS), len(ex.BETAS), n, ex.BINS)
    assert states["running"].shape == (len(ex.BATCHES_SEEN), n, 2)
    for name in ("input_hist", "normalized_hist", "output_hist"):
        assert (states[name].sum(axis=-1) == ex.BATCH).all(), name


def test_columns_follow_the_requested_distribution(states):
    feature, kind, mean, scale = ex.columns()
    batch_mean, batch_var = states["input_stats"][:, 0], states["input_stats"][:, 1]
    # a batch of 64 from (mean, scale): the batch mean is within a few standard errors
    bulk = np.asarray(ex.KINDS)[kind] != "outliers"
    assert np.all(np.abs(batch_mean - mean)[bulk] < 4 * scale[bulk] / np.sqrt(ex.BATCH))
    assert np.all((batch_var[bulk] > 0.4 * scale[bulk] ** 2) & (batch_var[bulk] < 2 * scale[bulk] ** 2))
    # same (feature, kind): one draw, shifted and scaled, so the normalized batch is the same
    norm = states["normalized_rows"][0].reshape(ex.FEATURES, len(ex.KINDS), -1, ex.ROWS_SHOWN)
    assert np.abs(norm - norm[:, :, :1]).max() <= 1  # hundredths; rounding at most
    # different features and kinds are different draws
    first = norm[:, :, 0].reshape(-1, ex.ROWS_SHOWN)
    assert len({row.tobytes() for row in first}) == len(first)


def test_training_states_normalize_and_apply_gamma_beta(states):
    mean, var, std = np.moveaxis(states["normalized_stats"][0], -1, 0)
    assert np.abs(mean).max() < 1e-5 and np.abs(var - 1).max() < 1e-3
    assert np.allclose(std, np.sqrt(var), rtol=1e-6)
    out = states["output_stats"][0]
    gammas = np.asarray(ex.GAMMAS)[:, None, None]
    betas = np.asarray(ex.BETAS)[None, :, None]
    assert np.abs(out[..., 0] - betas).max() < 1e-4
    assert np.abs(out[..., 2] - gammas).max() < 1e-3 * gammas.max()


def test_table_cells_are_the_textbook_formula(states):
    """Rows against (x - mean) / sqrt(var + eps) * gamma + beta in float64, from the input rows
    and the batch (training) or running (inference) statistics the page also shows."""
    x = states["input_rows"].astype(np.float64)
    batch_mean, batch_var = states["input_stats"][:, 0], states["input_stats"][:, 1]
    stats = [(batch_mean, batch_var)] + [tuple(r.T) for r in states["running"]]
    for mode, (mean, var) in enumerate(stats):
        xhat = (x - mean[:, None]) / np.sqrt(var[:, None].astype(np.float64) + EPS)
        tolerance = 1e-5 * (10 + np.abs(x) + np.abs(xhat))  # float32 arithmetic
        assert np.all(np.abs(states["normalized_rows"][mode] - xhat) <= tolerance), mode
        for g, gamma in enumerate(ex.GAMMAS):
            for b, beta in enumerate(ex.BETAS):
                y = states["output_rows"][mode, g, b]
                assert np.all(np.abs(y - (gamma * xhat + beta)) <= 5 * tolerance), (mode, g, b)


def test_running_statistics_follow_torch_semantics(states):
    """Momentum update with the unbiased batch variance, recomputed in float64 from the same
    batches the demo draws."""
    rng = np.random.default_rng(0)
    ex.draw_batch(rng)  # the batch on the page
    mean, var = np.zeros(states["running"].shape[1]), np.ones(states["running"].shape[1])
    for seen in range(1, max(ex.BATCHES_SEEN) + 1):
        batch = ex.draw_batch(rng).astype(np.float64)
        mean = (1 - ex.MOMENTUM) * mean + ex.MOMENTUM * batch.mean(axis=0)
        var = (1 - ex.MOMENTUM) * var + ex.MOMENTUM * batch.var(axis=0, ddof=1)
        if seen in ex.BATCHES_SEEN:
            running = states["running"][ex.BATCHES_SEEN.index(seen)]
            assert np.allclose(running[:, 0], mean, rtol=1e-4, atol=1e-3)
            assert np.allclose(running[:, 1], var, rtol=1e-4, atol=1e-3)
    # after 100 batches the running mean has converged; after 1 it is a tenth of the way there
    feature, kind, true_mean, scale = ex.columns()
    far = np.abs(true_mean) >= 10
    after_one, after_all = states["running"][0][:, 0], states["running"][-1][:, 0]
    assert np.allclose(after_one[far], 0.1 * true_mean[far], rtol=0.5)
    assert np.all(np.abs(after_all - true_mean) < 0.5 * scale + 0.05)


def test_statistics_are_bncupys(states):
    """Printed mean and variance are bncupy.moments of bncupy.batch_norm's output."""
    x = ex.draw_batch(np.random.default_rng(0))
    mean, var = bn.moments(x, axis=1)
    assert np.array_equal(states["input_stats"][:, 0], mean)
    assert np.array_equal(states["input_stats"][:, 1], var)
    g, b = 3, 1
    y = bn.batch_norm(x, None, None, np.full(x.shape[1], ex.GAMMAS[g], np.float32),
                      np.full(x.shape[1], ex.BETAS[b], np.float32), training=True)
    assert np.array_equal(states["output_stats"][0, g, b, :, 0], bn.moments(y, axis=1)[0])


def test_histograms_match_numpy_histogram(states):
    x = ex.draw_batch(np.random.default_rng(0))
    ranges = states["input_range"]
    for column in range(0, x.shape[1], 7):
        lo, hi = ranges[column]
        counts = np.histogram(x[:, column], bins=ex.BINS, range=(lo, hi))[0]
        assert np.array_equal(states["input_hist"][column], counts)
    clipped = np.clip(np.linspace(-30, 30, ex.BATCH)[:, None], -5, 5)
    counts = ex.histograms(clipped, np.array([[-5.0, 5.0]]))[0]
    assert counts[0] == counts[-1] and counts[0] > ex.BATCH // 3 and counts.sum() == ex.BATCH


def test_page_is_self_contained_and_small(page):
    assert len(page.encode()) < 2_000_000
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<link" not in page and "@import" not in page and "fetch(" not in page
    assert re.search(r"<script(?![^>]*type=\"application/)[^>]*>", page)  # inline JS
    assert "<li>one</li><li>caption &lt;b&gt;&amp;&lt;/b&gt;</li>" in page
    assert 'src="data:image/png;base64,' + base64.b64encode(b"\x89PNG fake").decode() in page


def test_page_data_decodes_to_every_state(page, states):
    meta = json.loads(re.search(r'<script id="meta" type="application/json">(.*?)</script>',
                                page, re.S).group(1))
    blob = gzip.decompress(base64.b64decode(
        re.search(r'<script id="data" type="application/octet-stream">(.*?)</script>', page,
                  re.S).group(1)))
    types = {"f4": "<f4", "i2": "<i2", "u1": "u1"}
    assert set(meta["layout"]) == set(states)
    for name, spec in meta["layout"].items():
        assert spec["offset"] % int(spec["type"][1]) == 0, name  # typed-array views need it
        count = int(np.prod(spec["shape"]))
        decoded = np.frombuffer(blob, types[spec["type"]], count, spec["offset"])
        expected = (np.rint(np.asarray(states[name], np.float64) * 100)
                    if name.endswith("_rows") else np.asarray(states[name], decoded.dtype))
        assert np.array_equal(decoded.reshape(spec["shape"]), expected), name
    assert meta["gammas"] == list(ex.GAMMAS) and meta["batchesSeen"] == list(ex.BATCHES_SEEN)


def test_page_is_deterministic(states):
    assert ex.render(ex.compute(seed=0), None, []) == ex.render(states, None, [])
    assert ex.render(ex.compute(seed=1), None, []) != ex.render(states, None, [])


def test_values_beyond_the_pages_int16_cells_are_refused(states):
    broken = dict(states, output_rows=states["output_rows"] * 1000)
    with pytest.raises(ValueError, match="output_rows"):
        ex.render(broken, None, [])


def test_unknown_distribution_is_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        ex.standard_draw(np.random.default_rng(0), "cauchy", 4)


def test_every_backend_computes_the_same_states(backend, states):
    """The demo builds the page with its own backend (the GPU's kernels when CuPy can run)."""
    other = ex.compute(seed=0, backend=backend.name)
    for name in ("input_rows", "normalized_rows", "output_rows", "normalized_stats",
                 "output_stats", "running"):
        assert np.allclose(other[name], states[name], rtol=1e-4, atol=1e-4), name
    assert f'"backend":"{backend.name}"' in ex.render(other, None, [], backend.name)

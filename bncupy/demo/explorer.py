"""``explorer.html``: the seed article's interactive batch-norm explainer, precomputed by bncupy.

A reader picks each feature's input distribution (kind, mean, scale), its gamma and beta, and
training or inference mode (running statistics after k batches), and sees the input, normalized
and output batches as tables, statistics and histograms. The page computes nothing: every state
reachable from its controls is computed here, once, with ``bncupy.batch_norm``,
``bncupy.BatchNorm1d`` and ``bncupy.moments`` (histogram counts by NumPy from
those values), packed into typed arrays, gzipped and inlined with hand-written JS and CSS, so
the page needs no network when it is opened.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

import bncupy as bn
from bncupy.backends.numpy import asarray as host

KINDS = ("normal", "uniform", "skewed", "bimodal", "outliers")
MEANS = (-10.0, 0.0, 10.0, 50.0)
SCALES = (0.5, 2.0, 10.0)
GAMMAS = (0.5, 1.0, 1.5, 2.0, 3.0)
BETAS = (-4.0, -2.0, 0.0, 2.0, 4.0)
BATCHES_SEEN = (1, 3, 10, 30, 100)  # inference modes: running statistics after this many batches
MOMENTUM = 0.1
FEATURES = 4
BATCH = 64
ROWS_SHOWN = 8
BINS = 20
NORMALIZED_RANGE = (-5.0, 5.0)
OUTPUT_RANGE = (-10.0, 10.0)
DEFAULTS = [  # (kind, mean, scale, gamma, beta) per feature, as indices into the grids
    (0, 1, 1, 1, 2),
    (1, 2, 1, 3, 1),
    (2, 2, 2, 1, 3),
    (3, 3, 1, 4, 2),
]


def standard_draw(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """``n`` draws of a distribution with population mean 0 and (bulk) standard deviation 1."""
    if kind == "normal":
        return rng.standard_normal(n)
    if kind == "uniform":
        return rng.uniform(-3**0.5, 3**0.5, n)
    if kind == "skewed":  # gamma(shape 2), centred and scaled: a long right tail
        return (rng.gamma(2.0, 1.0, n) - 2.0) / 2**0.5
    if kind == "bimodal":  # two narrow modes at -0.95 and +0.95
        return rng.choice([-0.95, 0.95], n) + 0.31 * rng.standard_normal(n)
    if kind == "outliers":  # normal bulk, about 5% of values 8 standard deviations out
        z = rng.standard_normal(n)
        hit = rng.random(n) < 0.05
        return np.where(hit, rng.choice([-8.0, 8.0], n), z)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def columns() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Feature, kind, mean and scale of every precomputed column (scale varies fastest)."""
    grid = np.indices((FEATURES, len(KINDS), len(MEANS), len(SCALES))).reshape(4, -1)
    return grid[0], grid[1], np.asarray(MEANS)[grid[2]], np.asarray(SCALES)[grid[3]]


def draw_batch(rng: np.random.Generator) -> np.ndarray:
    """One (BATCH, columns) float32 batch: each (feature, kind) has its own standardized draw,
    shifted and scaled to every (mean, scale) of the grid."""
    feature, kind, mean, scale = columns()
    z = {(f, k): standard_draw(rng, KINDS[k], BATCH)
         for f in range(FEATURES) for k in range(len(KINDS))}
    base = np.stack([z[f, k] for f, k in zip(feature, kind, strict=True)], axis=1)
    return (mean + scale * base).astype(np.float32)


def histograms(values: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """(columns, BINS) counts of each column of ``values`` in ``BINS`` equal bins over its
    range; values outside fall into the first or last bin (numpy.histogram's bins, one call)."""
    lo, hi = ranges[:, 0], ranges[:, 1]
    position = (values.astype(np.float64) - lo) / (hi - lo) * BINS
    index = np.clip(np.floor(position), 0, BINS - 1).astype(np.intp)
    flat = index + BINS * np.arange(values.shape[1])
    return np.bincount(flat.ravel(), minlength=BINS * values.shape[1]).reshape(-1, BINS)


@dataclass
class Panel:
    """What the page shows of one batch: the first rows, per-feature mean, variance and standard
    deviation, and histogram counts."""

    rows: list[np.ndarray] = field(default_factory=list)
    stats: list[np.ndarray] = field(default_factory=list)
    hist: list[np.ndarray] = field(default_factory=list)

    def add(self, values: np.ndarray, ranges: np.ndarray) -> None:
        """``values``: (BATCH, columns) from bncupy; ``ranges``: (columns, 2) histogram ranges,
        values outside fall into the first or last bin."""
        mean, var = bn.moments(values, axis=1)
        self.rows.append(values[:ROWS_SHOWN].T)
        self.stats.append(np.stack([mean, var, np.sqrt(var)], axis=1))
        self.hist.append(histograms(values, ranges))

    def arrays(self, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        return {"rows": np.stack(self.rows).reshape(shape + (ROWS_SHOWN,)),
                "stats": np.stack(self.stats).reshape(shape + (3,)),
                "hist": np.stack(self.hist).reshape(shape + (BINS,))}


def compute(seed: int = 0, backend: str = "numpy") -> dict[str, np.ndarray]:
    """Every state the page can show, computed with bncupy's ``backend`` (NumPy arrays out).

    Returns arrays indexed ``[mode, gamma, beta, column]`` (output), ``[mode, column]``
    (normalized) and ``[column]`` (input), where mode 0 is training and mode ``1 + i`` is
    inference after ``BATCHES_SEEN[i]`` training batches; columns as in :func:`columns`.
    """
    with bn.use_backend(backend):
        return _compute(seed)


def _compute(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = draw_batch(rng)
    n_columns = x.shape[1]
    lo, hi = x.min(axis=0), x.max(axis=0)
    pad = np.maximum(hi - lo, 1e-3) * 0.02
    input_range = np.stack([lo - pad, hi + pad], axis=1)
    fixed = {name: np.tile(np.asarray(r, np.float32), (n_columns, 1))
             for name, r in (("normalized", NORMALIZED_RANGE), ("output", OUTPUT_RANGE))}

    layer = bn.BatchNorm1d(n_columns, momentum=MOMENTUM, affine=False)
    running = []
    for seen in range(1, max(BATCHES_SEEN) + 1):
        layer(draw_batch(rng))
        if seen in BATCHES_SEEN:
            running.append((host(layer.running_mean).copy(), host(layer.running_var).copy()))
    modes: list[tuple[Any, Any, bool]] = [(None, None, True)] + [(m, v, False) for m, v in running]

    inputs, normalized, output = Panel(), Panel(), Panel()
    inputs.add(x, input_range)
    for mean, var, training in modes:
        normalized.add(bn.batch_norm(x, mean, var, training=training), fixed["normalized"])
        for gamma in GAMMAS:
            for beta in BETAS:
                weight = np.full(n_columns, gamma, np.float32)
                bias = np.full(n_columns, beta, np.float32)
                output.add(bn.batch_norm(x, mean, var, weight, bias, training=training),
                           fixed["output"])
    out = {f"input_{k}": v for k, v in inputs.arrays((n_columns,)).items()}
    out |= {f"normalized_{k}": v for k, v in normalized.arrays((len(modes), n_columns)).items()}
    out |= {f"output_{k}": v for k, v in
            output.arrays((len(modes), len(GAMMAS), len(BETAS), n_columns)).items()}
    out["input_range"] = input_range
    out["running"] = np.stack([np.stack(mv, axis=1) for mv in running])  # (k, column, 2)
    return out


def _pack(arrays: dict[str, np.ndarray]) -> tuple[dict[str, Any], bytes]:
    """One buffer of typed arrays (float32 first, then int16 table cells in hundredths, then
    uint8 counts, so every view is aligned) and the JSON layout that names them."""
    encoded: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        if name.endswith("_rows"):
            cents = np.rint(np.asarray(a, np.float64) * 100)
            if np.abs(cents).max() > np.iinfo(np.int16).max:
                raise ValueError(f"{name}: a table value exceeds the int16 range of the page")
            encoded[name] = cents.astype("<i2")
        elif name.endswith("_hist"):
            encoded[name] = np.asarray(a).astype(np.uint8)
        else:
            encoded[name] = np.asarray(a, "<f4")
    order = sorted(encoded, key=lambda k: -encoded[k].dtype.itemsize)
    layout: dict[str, Any] = {}
    chunks, offset = [], 0
    for name in order:
        a = np.ascontiguousarray(encoded[name])
        layout[name] = {"type": a.dtype.kind + str(a.dtype.itemsize), "offset": offset,
                        "shape": list(a.shape)}
        chunks.append(a.tobytes())
        offset += a.nbytes
    return layout, b"".join(chunks)


def _asset(name: str) -> str:
    return (resources.files(__package__) / "explorer_assets" / name).read_text(encoding="utf-8")


def render(arrays: dict[str, np.ndarray], curves_png: bytes | None, notes: Sequence[str],
           backend: str = "numpy") -> str:
    """The self-contained page: template + inline CSS + inline JS + gzipped data (computed by
    ``backend``), with the training curves (a PNG) and a list of ``notes`` about them."""
    layout, blob = _pack(arrays)
    meta = {
        "kinds": KINDS, "means": MEANS, "scales": SCALES, "gammas": GAMMAS, "betas": BETAS,
        "batchesSeen": BATCHES_SEEN, "momentum": MOMENTUM, "features": FEATURES,
        "batch": BATCH, "rowsShown": ROWS_SHOWN, "bins": BINS, "defaults": DEFAULTS,
        "ranges": {"normalized": NORMALIZED_RANGE, "output": OUTPUT_RANGE},
        "layout": layout, "bncupy": bn.__version__, "backend": backend,
    }
    data = base64.b64encode(gzip.compress(blob, compresslevel=9, mtime=0)).decode("ascii")
    curves = ("" if curves_png is None else
              '<img id="curves" alt="test accuracy against training steps, with and without '
              'batch norm" src="data:image/png;base64,'
              + base64.b64encode(curves_png).decode("ascii") + '">')
    replacements = {
        "/*STYLE*/": _asset("explorer.css"),
        "/*SCRIPT*/": _asset("explorer.js"),
        "/*META*/": json.dumps(meta, separators=(",", ":")).replace("</", "<\\/"),
        "/*DATA*/": data,
        "<!--CURVES-->": curves,
        "<!--NOTES-->": "".join(f"<li>{html.escape(note)}</li>" for note in notes),
    }
    page = _asset("explorer.html")
    for key, value in replacements.items():
        page = page.replace(key, value, 1)
    return page


def write(path: Path, seed: int = 0, curves_png: bytes | None = None,
          notes: Sequence[str] = (), backend: str = "numpy") -> None:
    """Compute every state with bncupy's ``backend`` and write the page to ``path``."""
    path.write_text(render(compute(seed, backend), curves_png, notes, backend),
                    encoding="utf-8")

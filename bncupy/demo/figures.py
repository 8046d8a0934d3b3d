"""The demo's PNG figures (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import bncupy as bn

from .experiments import PERCENTILES, Result


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_curves(results: list[Result], target: float, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, kind in zip(axes, ("mlp", "cnn"), strict=True):
        for r in results:
            if r.arm.name.startswith(kind):
                ax.plot(r.steps, r.test_accuracy, label=r.arm.name,
                        linestyle="-" if r.arm.batch_norm else "--")
        ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title({"mlp": "3x100 sigmoid MLP", "cnn": "conv-BN-ReLU net"}[kind])
        ax.set_xlabel("training step")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test accuracy")
    fig.suptitle("Batch normalization: test accuracy against steps (digits)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def percentile_bands(without: Result, with_bn: Result, path: Path) -> None:
    """The paper's Fig. 1(b, c): 15/50/85th percentiles of one last-layer sigmoid input."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharex=True)
    for ax, r, title in ((axes[0], without, "without BN"), (axes[1], with_bn, "with BN")):
        p = np.asarray(r.sigmoid_input_percentiles)
        ax.fill_between(r.steps, p[:, 0], p[:, 2], alpha=0.3,
                        label=f"{PERCENTILES[0]}th-{PERCENTILES[2]}th percentile")
        ax.plot(r.steps, p[:, 1], label="median")
        ax.set_title(f"input to a last-hidden-layer sigmoid, {title}")
        ax.set_xlabel("training step")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def distributions(path: Path, seed: int) -> None:
    """Input, normalized and scaled/shifted output of four features (as in the seeds' picture)."""
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    x = np.stack([rng.normal(0, 2, 256), rng.normal(12, 2, 256), rng.gamma(4, 4, 256),
                  rng.normal(30, 4, 256)], axis=1).astype(np.float32)
    xhat = bn.batch_norm(x, None, None, training=True)
    affine = [("gamma=2, beta=3 (all features)", np.full(4, 2.0), np.full(4, 3.0)),
              ("gamma=(0.5,1,2,1), beta=(-4,0,4,8)", np.array([0.5, 1, 2, 1]),
               np.array([-4.0, 0, 4, 8]))]
    columns = [("input", x), ("normalized (gamma=1, beta=0)", xhat)] + [
        (f"output, {title}", bn.batch_norm(x, None, None, g.astype(np.float32),
                                           b.astype(np.float32), training=True))
        for title, g, b in affine]
    fig, axes = plt.subplots(1, len(columns), figsize=(4.5 * len(columns), 3.5))
    for ax, (title, values) in zip(axes, columns, strict=True):
        for f in range(values.shape[1]):
            ax.hist(values[:, f], bins=30, alpha=0.5, label=f"F{f}")
        ax.set_title(title, fontsize=9)
    axes[0].legend()
    fig.suptitle("What batch norm does to four features of a batch of 256")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""The demo's PNG figures (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import bncupy as bn

from .experiments import PERCENTILES, Result

STYLE: dict[str, Any] = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
         "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.spines.top": False,
         "axes.spines.right": False}
CHANCE = 0.1  # ten classes


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.style.use(STYLE)
    return plt


def label(result: Result) -> str:
    """'MLP with BN, η=0.5' from the arm's name 'mlp+bn lr=0.5'."""
    model = "MLP" if result.arm.name.startswith("mlp") else "convnet"
    return f"{model} {'with' if result.arm.batch_norm else 'without'} BN, η={result.arm.lr:g}"


def accuracy_curves(results: list[Result], target: float, path: Path) -> None:
    """Test accuracy against steps on a log axis, the target and chance levels labelled, and a
    dot where each arm first reaches the target."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), sharey=True)
    for ax, kind in zip(axes, ("mlp", "cnn"), strict=True):
        arms = [r for r in results if r.arm.name.startswith(kind)]
        colours = {lr: f"C{i}" for i, lr in enumerate(sorted({r.arm.lr for r in arms}))}
        for r in arms:
            colour = colours[r.arm.lr]
            ax.plot(r.steps, r.test_accuracy, color=colour, linewidth=1.6,
                    linestyle="-" if r.arm.batch_norm else "--", label=label(r))
            reached = r.steps_to(target)
            if reached is not None:
                ax.plot([reached], [r.test_accuracy[r.steps.index(reached)]], "o", color=colour,
                        markersize=6, markeredgecolor="white")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter("{x:g}")  # 1, 10, 100 rather than 10^0, 10^1, 10^2
        ax.set_xlim(1, max(r.steps[-1] for r in arms))
        for level, text in ((target, f"target\n{target:.0%}"), (CHANCE, f"chance\n{CHANCE:.0%}")):
            ax.axhline(level, color="0.45", linewidth=0.9, linestyle=":")
            # right of the plotting area, where no curve can run into it
            ax.annotate(text, (1, level), xycoords=("axes fraction", "data"), xytext=(5, 0),
                        textcoords="offset points", color="0.3", fontsize=9, va="center")
        ax.set_title({"mlp": "3×100 sigmoid MLP (BN paper §4.1)",
                      "cnn": "conv → [BN] → ReLU → linear"}[kind])
        ax.set_xlabel("training step (log scale)")
        ax.grid(True, which="major", color="0.9")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False,
                  title="solid: with BN, dashed: without; ● first step at the target",
                  title_fontsize=10)
    axes[0].set_ylabel("test accuracy (500 held-out digits)")
    axes[0].set_ylim(0, 1.02)
    fig.suptitle("Batch normalization: test accuracy against training steps (sklearn digits)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def percentile_bands(without: Result, with_bn: Result, path: Path) -> None:
    """The paper's Fig. 1(b, c): 15/50/85th percentiles of one last-layer sigmoid's input."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharex=True, sharey=True)
    for ax, r in zip(axes, (without, with_bn), strict=True):
        p = np.asarray(r.sigmoid_input_percentiles)
        ax.fill_between(r.steps, p[:, 0], p[:, 2], alpha=0.25, color="C0", linewidth=0,
                        label=f"{PERCENTILES[0]}th to {PERCENTILES[2]}th percentile")
        for column, style in ((0, ":"), (1, "-"), (2, ":")):
            ax.plot(r.steps, p[:, column], color="C0", linestyle=style,
                    linewidth=1.8 if column == 1 else 1.0)
            ax.annotate(f"{PERCENTILES[column]}th", (r.steps[-1], p[-1, column]),
                        xytext=(4, 0), textcoords="offset points", va="center", fontsize=9,
                        color="C0")
        ax.axhline(0, color="0.6", linewidth=0.8)
        ax.set_title(label(r))
        ax.set_xlabel("training step")
        ax.grid(True, color="0.92")
    axes[0].set_ylabel("input to the sigmoid\n(unit 0 of the last hidden layer)")
    axes[0].legend(loc="lower left")
    fig.suptitle("Distribution of a last-layer sigmoid's input over 500 test digits "
                 "(BN paper, Fig. 1b,c)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fixed(value: float, digits: int = 2) -> str:
    """``value`` rounded, without a minus sign on a value that rounds to zero."""
    text = f"{value:.{digits}f}"
    return text[1:] if float(text) == 0 and text.startswith("-") else text


def distributions(path: Path, seed: int) -> None:
    """Input, normalized and scaled/shifted output of four features of one batch: a column per
    stage with a shared x axis, a row per feature so that no feature hides another."""
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    features = ["normal(0, 2)", "normal(12, 2)", "gamma(4, 4), skewed", "normal(30, 4)"]
    x = np.stack([rng.normal(0, 2, 256), rng.normal(12, 2, 256), rng.gamma(4, 4, 256),
                  rng.normal(30, 4, 256)], axis=1).astype(np.float32)
    gamma = np.array([0.5, 1.0, 2.0, 1.0], np.float32)
    beta = np.array([-4.0, 0.0, 4.0, 8.0], np.float32)
    columns = [
        ("input x", x),
        ("normalized x̂ = (x − mean) / √(var + ε)",
         bn.batch_norm(x, None, None, training=True)),
        ("output y = γ·x̂ + β", bn.batch_norm(x, None, None, gamma, beta, training=True)),
    ]
    fig = plt.figure(figsize=(13, 9.5), layout="constrained")
    fig.suptitle("What batch norm does to each of four features of one batch of 256 "
                 "(black line: the feature's mean)", fontsize=13)
    for j, (sub, (title, values)) in enumerate(zip(fig.subfigures(1, len(columns)), columns,
                                                    strict=True)):
        sub.suptitle(title, fontweight="bold")
        axes = sub.subplots(len(features), 1, sharex=True)
        mean, var = bn.moments(values, axis=1)
        for f, ax in enumerate(axes):
            ax.hist(values[:, f], bins=30, color=f"C{f}", alpha=0.85)
            ax.axvline(float(mean[f]), color="black", linewidth=1.2)
            head = [f"F{f} {features[f]}", f"F{f}", f"F{f} γ={gamma[f]:g}, β={beta[f]:g}"][j]
            ax.set_title(f"{head}: mean {_fixed(float(mean[f]))}, "
                         f"sd {_fixed(float(np.sqrt(var[f])))}", fontsize=10)
            ax.set_ylabel("count")
        axes[-1].set_xlabel("value")
    fig.savefig(path, dpi=110)
    plt.close(fig)

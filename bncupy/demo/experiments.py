"""The demo's experiments: the BN paper's section-4.1 MLP and a small convnet, on sklearn digits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import nn

HIDDEN = 100
PERCENTILES = (15, 50, 85)


@dataclass
class Data:
    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any


def load_digits(xp: Any, seed: int) -> Data:
    """sklearn's bundled 8x8 digits (no download), a fixed stratified 72/28 split, scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_load
    from sklearn.model_selection import train_test_split

    digits = sk_load()
    x = (digits.data / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=500,
                                              stratify=digits.target, random_state=seed)
    return Data(*(xp.asarray(a) for a in (x_tr, y_tr, x_te, y_te)))


def mlp(xp: Any, rng: np.random.Generator, batch_norm: bool) -> nn.Network:
    """64-100-100-100-10 sigmoid MLP; with batch norm before every sigmoid (paper section 4.1)."""
    modules: list[Any] = []
    width = 64
    for _ in range(3):
        modules.append(nn.Linear(xp, rng, width, HIDDEN, bias=not batch_norm))
        if batch_norm:
            modules.append(nn.batch_norm_1d(HIDDEN))
        modules.append(nn.Sigmoid(xp))
        width = HIDDEN
    modules.append(nn.Linear(xp, rng, HIDDEN, 10))
    return nn.Network(xp, modules)


def convnet(xp: Any, rng: np.random.Generator, batch_norm: bool) -> nn.Network:
    """conv 3x3 (16) -> [BatchNorm2d] -> ReLU -> linear, on 1x8x8 NCHW images."""
    modules: list[Any] = [nn.Conv2d(xp, rng, 1, 16, 3, bias=not batch_norm)]
    if batch_norm:
        modules.append(nn.batch_norm_2d(16))
    modules += [nn.ReLU(), nn.Flatten(), nn.Linear(xp, rng, 16 * 6 * 6, 10)]
    return nn.Network(xp, modules)


@dataclass
class Arm:
    name: str
    batch_norm: bool
    lr: float
    build: Callable[[Any, np.random.Generator, bool], nn.Network]
    image: bool = False  # feed (N, 1, 8, 8) instead of (N, 64)
    probe: int | None = None  # leading modules whose output is the last sigmoid's input


@dataclass
class Result:
    arm: Arm
    steps: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    sigmoid_input_percentiles: list[list[float]] = field(default_factory=list)

    def steps_to(self, target: float) -> int | None:
        return next((s for s, a in zip(self.steps, self.test_accuracy, strict=False) if a >= target), None)


def arms(lr: float, conv_lr: float) -> list[Arm]:
    """{no BN, BN} x {lr, 5 lr} for the MLP, and the convnet with and without BN."""
    out = []
    for factor in (1, 5):
        for use_bn in (False, True):
            # The last sigmoid's input: output of the third Linear (no BN) or of the third BN.
            probe = 8 if use_bn else 5
            out.append(Arm(f"mlp{'+bn' if use_bn else ''} lr={lr * factor:g}", use_bn,
                           lr * factor, mlp, probe=probe))
    for use_bn in (False, True):
        out.append(Arm(f"cnn{'+bn' if use_bn else ''} lr={conv_lr:g}", use_bn, conv_lr, convnet,
                       image=True))
    return out


def eval_steps(steps: int, eval_every: int) -> set[int]:
    """Every ``eval_every``-th step, the last, and about ten steps per decade before that (the
    arms differ most in their first few hundred steps, which the figures show on a log axis)."""
    early, step = set(), 1.0
    while step < min(4 * eval_every, steps):
        early.add(round(step))
        step *= 10 ** 0.1
    return early | set(range(eval_every, steps + 1, eval_every)) | {steps}


def train(xp: Any, data: Data, arm: Arm, steps: int, batch: int, eval_every: int, seed: int,
          progress: Callable[[int], None] = lambda n: None) -> Result:
    """Train one arm with SGD; evaluate test accuracy (and the probe percentiles) at
    :func:`eval_steps`."""
    checkpoints = eval_steps(steps, eval_every)
    rng = np.random.default_rng(seed)
    net = arm.build(xp, rng, arm.batch_norm)
    shape = (-1, 1, 8, 8) if arm.image else (-1, 64)
    x_test = data.x_test.reshape(shape)
    n = data.x_train.shape[0]
    order = rng.permutation(n)
    cursor = 0
    result = Result(arm)
    losses = []
    for step in range(1, steps + 1):
        if cursor + batch > n:
            order, cursor = rng.permutation(n), 0
        idx = xp.asarray(order[cursor:cursor + batch])
        cursor += batch
        losses.append(net.sgd_step(data.x_train[idx].reshape(shape), data.y_train[idx], arm.lr))
        if step in checkpoints:
            progress(step - (result.steps[-1] if result.steps else 0))
            result.steps.append(step)
            result.test_accuracy.append(net.accuracy(x_test, data.y_test))
            result.loss.append(float(np.mean(losses)))
            losses = []
            if arm.probe is not None:
                net.train(False)
                unit = net.forward(x_test, upto=arm.probe)[:, 0]
                net.train(True)
                values = np.asarray(unit.get() if hasattr(unit, "get") else unit)
                result.sigmoid_input_percentiles.append(
                    [float(p) for p in np.percentile(values, PERCENTILES)])
    return result

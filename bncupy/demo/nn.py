"""Minimal layers for the demo, written for any NumPy-compatible array module ``xp``.

Each module has ``forward(x)``, ``backward(grad) -> grad_input`` and ``params()`` returning
``(value, grad)`` pairs for SGD. Batch normalization comes from bncupy itself.
"""

from __future__ import annotations

from typing import Any

import bncupy as bn


class Linear:
    """``y = x @ W.T + b`` with Xavier-uniform weights (no bias when followed by batch norm)."""

    def __init__(self, xp: Any, rng: Any, n_in: int, n_out: int, bias: bool = True) -> None:
        limit = (6.0 / (n_in + n_out)) ** 0.5
        self.w = xp.asarray(rng.uniform(-limit, limit, (n_out, n_in)).astype("float32"))
        self.b = xp.zeros(n_out, "float32") if bias else None
        self.gw = self.gb = None

    def forward(self, x: Any) -> Any:
        self.x = x
        y = x @ self.w.T
        return y if self.b is None else y + self.b

    def backward(self, g: Any) -> Any:
        self.gw = g.T @ self.x
        if self.b is not None:
            self.gb = g.sum(axis=0)
        return g @ self.w

    def params(self) -> list[tuple[Any, Any]]:
        pairs = [(self.w, self.gw)]
        return pairs if self.b is None else pairs + [(self.b, self.gb)]


class Conv2d:
    """3x3-style valid convolution (stride 1) on NCHW data via im2col and one matrix product."""

    def __init__(self, xp: Any, rng: Any, c_in: int, c_out: int, k: int, bias: bool = True):
        limit = (6.0 / (c_in * k * k + c_out * k * k)) ** 0.5
        self.xp, self.k = xp, k
        self.w = xp.asarray(rng.uniform(-limit, limit, (c_out, c_in * k * k)).astype("float32"))
        self.b = xp.zeros(c_out, "float32") if bias else None
        self.gw = self.gb = None

    def _im2col(self, x: Any) -> Any:
        n, c, h, w = x.shape
        k = self.k
        cols = self.xp.stack([x[:, :, i:i + h - k + 1, j:j + w - k + 1]
                              for i in range(k) for j in range(k)], axis=2)  # (n, c, k*k, oh, ow)
        return cols.transpose(0, 3, 4, 1, 2).reshape(n * (h - k + 1) * (w - k + 1), c * k * k)

    def forward(self, x: Any) -> Any:
        n, _, h, w = x.shape
        self.shape, self.cols = x.shape, self._im2col(x)
        oh, ow = h - self.k + 1, w - self.k + 1
        y = self.cols @ self.w.T
        if self.b is not None:
            y = y + self.b
        return self.xp.ascontiguousarray(y.reshape(n, oh, ow, -1).transpose(0, 3, 1, 2))

    def backward(self, g: Any) -> Any:
        n, c, h, w = self.shape
        k, oh, ow = self.k, h - self.k + 1, w - self.k + 1
        g2 = g.transpose(0, 2, 3, 1).reshape(n * oh * ow, -1)
        self.gw = g2.T @ self.cols
        if self.b is not None:
            self.gb = g2.sum(axis=0)
        dcols = (g2 @ self.w).reshape(n, oh, ow, c, k * k)
        dx = self.xp.zeros(self.shape, g.dtype)
        for idx in range(k * k):
            i, j = divmod(idx, k)
            dx[:, :, i:i + oh, j:j + ow] += dcols[..., idx].transpose(0, 3, 1, 2)
        return dx

    def params(self) -> list[tuple[Any, Any]]:
        pairs = [(self.w, self.gw)]
        return pairs if self.b is None else pairs + [(self.b, self.gb)]


class Sigmoid:
    def __init__(self, xp: Any) -> None:
        self.xp = xp

    def forward(self, x: Any) -> Any:
        self.y = 1.0 / (1.0 + self.xp.exp(-self.xp.clip(x, -60.0, 60.0)))
        return self.y

    def backward(self, g: Any) -> Any:
        return g * self.y * (1.0 - self.y)

    def params(self) -> list[tuple[Any, Any]]:
        return []


class ReLU:
    def forward(self, x: Any) -> Any:
        self.mask = x > 0
        return x * self.mask

    def backward(self, g: Any) -> Any:
        return g * self.mask

    def params(self) -> list[tuple[Any, Any]]:
        return []


class Flatten:
    def forward(self, x: Any) -> Any:
        self.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, g: Any) -> Any:
        return g.reshape(self.shape)

    def params(self) -> list[tuple[Any, Any]]:
        return []


class BatchNorm:
    """Adapter giving a bncupy layer the demo's module interface."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer

    def forward(self, x: Any) -> Any:
        return self.layer(x)

    def backward(self, g: Any) -> Any:
        return self.layer.backward(g)

    def params(self) -> list[tuple[Any, Any]]:
        return [(self.layer.weight, self.layer.grad_weight),
                (self.layer.bias, self.layer.grad_bias)]


def batch_norm_1d(features: int) -> BatchNorm:
    return BatchNorm(bn.BatchNorm1d(features))


def batch_norm_2d(channels: int) -> BatchNorm:
    return BatchNorm(bn.BatchNorm2d(channels))


class Network:
    """A sequence of modules trained with softmax cross-entropy and plain SGD."""

    def __init__(self, xp: Any, modules: list[Any]) -> None:
        self.xp, self.modules = xp, modules

    def forward(self, x: Any, upto: int | None = None) -> Any:
        for module in self.modules[:upto]:
            x = module.forward(x)
        return x

    def train(self, mode: bool) -> None:
        for module in self.modules:
            if isinstance(module, BatchNorm):
                module.layer.train(mode)

    def sgd_step(self, x: Any, labels: Any, lr: float) -> float:
        """One step on a batch; returns the batch's mean cross-entropy."""
        xp = self.xp
        logits = self.forward(x)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        n = x.shape[0]
        loss = -float(log_p[xp.arange(n), labels].mean())
        g = xp.exp(log_p)
        g[xp.arange(n), labels] -= 1.0
        g /= n
        for module in reversed(self.modules):
            g = module.backward(g)
        for module in self.modules:
            for value, grad in module.params():
                value -= lr * grad
        return loss

    def accuracy(self, x: Any, labels: Any) -> float:
        self.train(False)
        predicted = self.forward(x).argmax(axis=1)
        self.train(True)
        return float((predicted == labels).mean())

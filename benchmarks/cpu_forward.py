"""bncupy's NumPy backend against torch-CPU ``F.batch_norm`` on the same machine.

usage: python benchmarks/cpu_forward.py [--reps N] [--threads T]
Prints the median milliseconds (bncupy and torch timed in alternating blocks) of forward-train,
forward-eval and backward for (32, 64, 56, 56) float32 (the target shape) and a few others.
torch is optional (``pip install torch==2.13.0``).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import bncupy as bn

SHAPES = [(32, 64, 56, 56), (256, 64, 14, 14), (32, 512, 7, 7), (8, 56, 56, 64)]


def blocked_median_ms(fns, reps: int, block: int = 10) -> list[float]:
    """Median ms of each callable, timed in alternating blocks of ``block`` calls whose first
    call is dropped: both libraries see the same machine state, and neither is timed right
    after the other (OpenBLAS and OpenMP worker threads spin for a while after a call)."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, reps // block)):
        for fn, acc in zip(fns, times, strict=True):
            for i in range(block + 1):
                start = time.perf_counter()
                fn()
                if i:
                    acc.append(time.perf_counter() - start)
    return [float(np.median(t)) * 1e3 for t in times]


def _ops(shape: tuple[int, ...], torch) -> tuple[dict, dict, str]:
    """bncupy and torch callables for one shape ((8, 56, 56, 64) is channels-last)."""
    channels_last = shape[-1] == 64 and shape[1] == 56
    axis = -1 if channels_last else 1
    c = shape[axis]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    dy = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    _, m, s = bn.batch_norm_forward(x, None, None, w, b, True, axis=axis)
    ours = {
        "fwd_train": lambda: bn.batch_norm(x, rm, rv, w, b, True, axis=axis),
        "fwd_eval": lambda: bn.batch_norm(x, rm, rv, w, b, False, axis=axis),
        "bwd": lambda: bn.batch_norm_backward(dy, x, w, m, s, axis=axis),
    }
    label = f"{shape}{' NHWC' if channels_last else ''}"
    if torch is None:
        return ours, {}, label
    F = torch.nn.functional
    tx = torch.from_numpy(np.moveaxis(x, axis, 1))
    if channels_last:
        tx = tx.contiguous(memory_format=torch.channels_last)
    tw, tb = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
    trm, trv = torch.zeros(c), torch.ones(c)
    txg = tx.detach().requires_grad_(True)
    ty = F.batch_norm(txg, trm, trv, tw, tb, True)
    tdy = torch.from_numpy(np.moveaxis(dy, axis, 1))
    theirs = {
        "fwd_train": lambda: F.batch_norm(tx, trm, trv, tw.detach(), tb.detach(), True),
        "fwd_eval": lambda: F.batch_norm(tx, trm, trv, tw.detach(), tb.detach(), False),
        "bwd": lambda: torch.autograd.grad(ty, (txg, tw, tb), tdy, retain_graph=True),
    }
    return ours, theirs, label


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    os.environ["BNCUPY_NUM_THREADS"] = str(args.threads)
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    print(f"cores {os.cpu_count()}, threads {args.threads}, numpy {np.__version__}, "
          f"torch {torch.__version__ if torch else 'absent'}")
    print(f"{'shape':22} {'op':10} {'bncupy ms':>10} {'torch ms':>10} {'ratio':>6}")
    for shape in SHAPES:
        ours, theirs, label = _ops(shape, torch)
        for op, fn in ours.items():
            t_ours, t_torch = blocked_median_ms([fn, theirs[op]], args.reps) if theirs else \
                (blocked_median_ms([fn], args.reps)[0], float("nan"))
            print(f"{label:22} {op:10} {t_ours:10.2f} {t_torch:10.2f} {t_torch / t_ours:6.2f}")


if __name__ == "__main__":
    main()

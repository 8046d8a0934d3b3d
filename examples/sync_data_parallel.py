"""Data-parallel training with SyncBatchNorm under MPI.

    mpiexec -n 4 python examples/sync_data_parallel.py

Every rank holds a replica of a small MLP (linear -> SyncBatchNorm -> ReLU -> linear) and trains
on its shard of each global batch. SyncBatchNorm normalizes with the statistics of the whole global
batch (one all-gather forward, one backward); the linear layers' gradients are averaged with an
Allreduce (summed: each shard's loss is already divided by the global batch size), so
the replicas stay identical. Synthetic data: four Gaussian clusters in 16-D.
Install: pip install "bncupy[mpi]".
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

import bncupy as bn

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

rng = np.random.default_rng(0)  # same stream everywhere: same data and same initial weights
centers = rng.standard_normal((4, 16)) * 0.6
labels = rng.integers(0, 4, 4096)
data = (centers[labels] + rng.standard_normal((4096, 16))).astype(np.float32)
w1 = (rng.standard_normal((64, 16)) / 4).astype(np.float32)
w2 = (rng.standard_normal((4, 64)) / 8).astype(np.float32)
norm = bn.SyncBatchNorm(64, comm=comm, activation="relu")


def allreduce_sum(grad: np.ndarray) -> np.ndarray:
    """The shards' partial gradients add up to the gradient of the global batch."""
    out = np.empty_like(grad)
    comm.Allreduce(grad, out, op=MPI.SUM)
    return out


global_batch, lr = 128, 0.1
for step in range(300):
    idx = rng.integers(0, len(data), global_batch)  # identical on every rank
    mine = np.array_split(idx, size)[rank]  # this rank's shard (may be uneven)
    x, y = data[mine], labels[mine]
    h = x @ w1.T
    a = norm(h)
    logits = a @ w2.T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    g = p.copy()
    g[np.arange(len(y)), y] -= 1
    g /= global_batch  # gradient of the mean loss over the global batch
    g_w2 = g.T @ a
    g_h = norm.backward(g @ w2)  # SyncBatchNorm: global statistics, global grad_weight/bias
    g_w1 = g_h.T @ x
    w1 -= lr * allreduce_sum(g_w1)
    w2 -= lr * allreduce_sum(g_w2)
    norm.weight -= lr * norm.grad_weight  # already global and identical on every rank
    norm.bias -= lr * norm.grad_bias
    if step % 50 == 0 or step == 299:
        correct = comm.allreduce(int((p.argmax(axis=1) == y).sum()), op=MPI.SUM)
        if rank == 0:
            print(f"step {step:3d}: global-batch accuracy {correct / global_batch:.1%}")

norm.eval()
if rank == 0:
    accuracy = ((norm(data @ w1.T) @ w2.T).argmax(axis=1) == labels).mean()
    print(f"ranks {size}: final accuracy on all data {accuracy:.1%}; running_var[:3] = "
          f"{np.round(norm.running_var[:3], 3)}")

"""Helpers for SyncBatchNorm tests: a thread-backed MPI-like world, a collective-counting wrapper,
and the per-rank check shared by the in-process and the real ``mpiexec`` tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

import bncupy as bn
from tests.arrays import assign


class ThreadWorld:
    """``size`` ranks as threads; ``comm(rank)`` returns an mpi4py-like communicator."""

    def __init__(self, size: int, timeout: float = 20.0) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots: list[Any] = [None] * size

    def comm(self, rank: int) -> ThreadComm:
        return ThreadComm(self, rank)

    def run(self, fn: Callable[[Any, int], Any]) -> list[Any]:
        """``fn(comm, rank)`` on every rank; returns results (or the exception each raised)."""
        results: list[Any] = [None] * self.size

        def target(rank: int) -> None:
            try:
                results[rank] = fn(self.comm(rank), rank)
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                results[rank] = exc

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


class ThreadComm:
    def __init__(self, world: ThreadWorld, rank: int) -> None:
        self.world, self.rank = world, rank

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's spelling
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.world.size

    def allgather(self, obj: Any) -> list[Any]:
        self.world.slots[self.rank] = obj
        self.world.barrier.wait()
        out = list(self.world.slots)
        self.world.barrier.wait()
        return out


class CountingComm:
    """Wraps an mpi4py-like communicator and counts its collective calls."""

    COLLECTIVES = ("allgather", "Allgather", "allreduce", "Allreduce", "bcast", "Bcast",
                   "gather", "Gather", "reduce", "Reduce", "barrier", "Barrier", "alltoall")

    def __init__(self, comm: Any) -> None:
        self._comm = comm
        self.calls: list[str] = []

    def Get_rank(self) -> int:  # noqa: N802
        return self._comm.Get_rank()

    def Get_size(self) -> int:  # noqa: N802
        return self._comm.Get_size()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._comm, name)
        if name in self.COLLECTIVES:
            def counted(*args: Any, **kwargs: Any) -> Any:
                self.calls.append(name)
                return attr(*args, **kwargs)
            return counted
        return attr


def split_points(rng: np.random.Generator, n: int, size: int) -> list[int]:
    """Random cut points of n rows into ``size`` slices, empty slices allowed."""
    return sorted(rng.integers(0, n + 1, size - 1).tolist())


def check_rank(comm: Any, rank: int, size: int, seed: int, shape: tuple[int, ...],
               momentum: float | None = 0.1, channels_last: bool = False,
               activation: str | None = None) -> int:
    """Train 3 steps with SyncBatchNorm on this rank's slice and with BatchNorm on the whole
    global batch; assert outputs, running statistics and gradients agree. Returns #checks."""
    rng = np.random.default_rng(seed)  # same stream on every rank
    axis = -1 if channels_last else 1
    c = shape[axis]
    layer = bn.SyncBatchNorm(c, momentum=momentum, dtype=np.float64, comm=comm,
                             channels_last=channels_last, activation=activation)
    ref = bn.SyncBatchNorm(c, momentum=momentum, dtype=np.float64, comm=None,
                           channels_last=channels_last, activation=activation)
    for layer_ in (layer, ref):
        assign(layer_.weight, np.linspace(0.5, 1.5, c))
        assign(layer_.bias, np.linspace(-1, 1, c))
    checks = 0
    for _ in range(3):
        x = rng.standard_normal(shape) * 3 + 2
        z = rng.standard_normal(shape)
        dy = rng.standard_normal(shape)
        cuts = [0, *split_points(rng, shape[0], size), shape[0]]
        part = slice(cuts[rank], cuts[rank + 1])
        kwargs = {"residual": z[part]} if activation else {}
        y = layer(x[part], **kwargs)
        y_ref = ref(x, **({"residual": z} if activation else {}))
        np.testing.assert_allclose(y, y_ref[part], rtol=1e-10, atol=1e-10)
        dx = layer.backward(dy[part])
        dx_ref = ref.backward(dy)
        np.testing.assert_allclose(dx, dx_ref[part], rtol=1e-9, atol=1e-10)
        for name in ("grad_weight", "grad_bias", "running_mean", "running_var"):
            np.testing.assert_allclose(getattr(layer, name), getattr(ref, name), rtol=1e-10,
                                       atol=1e-10, err_msg=name)
        checks += 1
    assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    return checks

"""Communicator adapters for SyncBatchNorm: mpi4py and ``cupyx.distributed`` NCCL.

Each adapter offers one collective, :meth:`exchange`: every rank contributes a float64 vector of
the same length and receives all of them stacked in rank order, ``(size, length)``. Reductions
are then done locally in rank order, so every rank computes bitwise the same result.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class MPIComm:
    """An mpi4py communicator (NumPy or CuPy arrays; CuPy data is staged through host memory)."""

    kind = "mpi"

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.rank = int(comm.Get_rank())
        self.size = int(comm.Get_size())

    def exchange(self, vector: Any) -> Any:
        # Pickle-based allgather tolerates ranks sending different lengths (a configuration
        # mismatch), which every rank then reports instead of hanging in a sized collective.
        host = vector.get() if hasattr(vector, "get") else np.asarray(vector)
        parts = self.comm.allgather(np.ascontiguousarray(host, dtype=np.float64))
        lengths = {len(p) for p in parts}
        if len(lengths) != 1:
            raise ValueError(f"SyncBatchNorm ranks disagree on the number of channels: message "
                             f"lengths {[len(p) for p in parts]} (rank order)")
        stacked = np.stack(parts)
        return stacked if not hasattr(vector, "get") else _cupy().asarray(stacked)


class NCCLComm:
    """A ``cupyx.distributed`` NCCL communicator (CuPy arrays only)."""

    kind = "nccl"

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.rank = int(comm.rank)
        self.size = int(getattr(comm, "_n_devices", getattr(comm, "size", 1)))

    def exchange(self, vector: Any) -> Any:
        cupy = _cupy()
        send = cupy.ascontiguousarray(vector, dtype=cupy.float64)
        out = cupy.empty(self.size * send.size, cupy.float64)
        self.comm.all_gather(send, out, send.size)
        return out.reshape(self.size, send.size)


def _cupy() -> Any:
    from .backends import cupy as cupy_backend

    return cupy_backend.require()


def wrap(comm: Any) -> MPIComm | NCCLComm | None:
    """Adapter for ``comm``: None, an mpi4py communicator, or a cupyx.distributed NCCL one."""
    if comm is None:
        return None
    if hasattr(comm, "Get_rank") and hasattr(comm, "allgather"):
        return MPIComm(comm)
    if hasattr(comm, "all_gather") and hasattr(comm, "rank"):
        return NCCLComm(comm)
    raise TypeError(f"comm must be an mpi4py communicator, a cupyx.distributed NCCL "
                    f"communicator or None, got {type(comm).__name__}")

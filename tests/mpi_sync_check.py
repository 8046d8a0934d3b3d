"""Run under ``mpiexec -n N``: SyncBatchNorm over real processes equals BatchNorm of the whole.

Every rank draws the same global batches (same seed), keeps its own slice (random sizes, empty
slices included), and checks outputs, running statistics and gradients against a single-process
layer over the concatenated batch. Prints ``rank R of N: ok (K checks)``.
"""

from __future__ import annotations

import sys

from mpi4py import MPI

from tests.sync_world import CountingComm, check_rank


def main() -> int:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    checks = 0
    for seed in range(6):
        for shape, channels_last in (((7, 3, 4), False), ((size + 3, 5, 2, 3), True)):
            for momentum in (0.1, None):
                checks += check_rank(comm, rank, size, seed, shape, momentum, channels_last)
    checks += check_rank(comm, rank, size, 99, (10, 3, 4, 4), 0.1, False, "relu")
    counting = CountingComm(comm)
    check_rank(counting, rank, size, 5, (6, 2, 3), 0.1)
    # Three training steps: one all-gather forward and one backward each.
    assert counting.calls == ["allgather"] * 6, counting.calls
    print(f"rank {rank} of {size}: ok ({checks} checks)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SyncBatchNorm and its building blocks: in-process worlds here, real processes under mpiexec."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bncupy as bn
from tests import oracle
from tests.arrays import to_numpy
from tests.conftest import needs, requirement
from tests.sync_world import CountingComm, ThreadWorld, check_rank, split_points


@given(seed=st.integers(0, 2**32 - 1), parts=st.integers(1, 5), channels_last=st.booleans())
def test_building_blocks_over_any_split_equal_batch_norm_of_the_whole(backend, seed, parts,
                                                                      channels_last):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 12))
    shape = (n, 4, 3) if channels_last else (n, 3, 4)
    axis = -1 if channels_last else 1
    x = rng.standard_normal(shape) * 2 + 5
    dy = rng.standard_normal(shape)
    w, b = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    cuts = [0, *split_points(rng, shape[0], parts), shape[0]]
    slices = [slice(cuts[i], cuts[i + 1]) for i in range(parts)]
    xs = [backend.asarray(x[s]) for s in slices]
    dys = [backend.asarray(dy[s]) for s in slices]
    wd, bd = backend.asarray(w), backend.asarray(b)
    rm, rv = backend.asarray(np.zeros(3)), backend.asarray(np.ones(3))
    partials = [bn.batch_norm_stats(xi, axis=axis) for xi in xs]
    mean, invstd = bn.batch_norm_gather_stats(partials, rm, rv, 0.1, 1e-5)
    y = np.concatenate([backend.to_numpy(bn.batch_norm_elemt(xi, wd, bd, mean, invstd, axis=axis))
                        for xi in xs])
    ref_y, _, ref_invstd, ref_rm, ref_rv = oracle.forward(x, axis, w, b, 1e-5, True,
                                                           np.zeros(3), np.ones(3))
    np.testing.assert_allclose(y, ref_y, atol=1e-10)
    np.testing.assert_allclose(backend.to_numpy(invstd), ref_invstd, rtol=1e-10)
    np.testing.assert_allclose(backend.to_numpy(rm), ref_rm, atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(rv), ref_rv, rtol=1e-10)
    sums = [bn.batch_norm_backward_reduce(dyi, xi, mean, invstd, axis=axis)
            for dyi, xi in zip(dys, xs, strict=True)]
    sum_dy = sum(s[0] for s in sums)
    sum_dy_xmu = sum(s[1] for s in sums)
    count = x.size // 3
    dx = np.concatenate([backend.to_numpy(bn.batch_norm_backward_elemt(
        dyi, xi, mean, invstd, wd, sum_dy, sum_dy_xmu, count, axis=axis))
        for dyi, xi in zip(dys, xs, strict=True)])
    ref_dx, ref_dw, ref_db = oracle.backward(dy, x, axis, w)
    np.testing.assert_allclose(dx, ref_dx, atol=1e-10)
    np.testing.assert_allclose(backend.to_numpy(sum_dy), ref_db, atol=1e-10)
    np.testing.assert_allclose(backend.to_numpy(sum_dy_xmu * invstd), ref_dw, atol=1e-10)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_threaded_world_matches_global_batch_norm(size, momentum):
    world = ThreadWorld(size)
    results = world.run(lambda comm, rank: check_rank(comm, rank, size, 7, (9, 3, 5),
                                                       momentum))
    assert results == [3] * size, results


@pytest.mark.parametrize("channels_last, activation", [(True, None), (False, "relu"),
                                                       (True, "relu")])
def test_threaded_world_channels_last_and_fused(channels_last, activation):
    world = ThreadWorld(3)
    shape = (8, 4, 5, 3) if channels_last else (8, 3, 4, 5)
    results = world.run(lambda comm, rank: check_rank(comm, rank, 3, 11, shape, 0.1,
                                                      channels_last, activation))
    assert results == [3] * 3, results


def test_empty_ranks_take_part():
    world = ThreadWorld(4)

    def fn(comm, rank):
        layer = bn.SyncBatchNorm(2, comm=comm, dtype=np.float64)
        x = np.arange(12.0).reshape(6, 2) if rank == 2 else np.zeros((0, 2))
        y = layer(x)
        dx = layer.backward(np.ones_like(x))
        assert dx.shape == x.shape
        return y.shape, dx.shape, layer.running_mean.copy(), layer.grad_bias.copy()

    results = world.run(fn)
    assert all(not isinstance(r, BaseException) for r in results), results
    for _, _, rm, gb in results:
        np.testing.assert_allclose(rm, 0.1 * np.array([5.0, 6.0]))
        np.testing.assert_allclose(gb, [6.0, 6.0])
    assert [r[0] for r in results] == [(0, 2), (0, 2), (6, 2), (0, 2)]


def test_exactly_one_collective_per_forward_and_backward():
    world = ThreadWorld(2)
    counters = [None, None]

    def fn(comm, rank):
        counting = CountingComm(comm)
        counters[rank] = counting
        layer = bn.SyncBatchNorm(3, comm=counting)
        x = np.random.default_rng(rank).standard_normal((4, 3, 2)).astype(np.float32)
        layer(x)
        after_forward = list(counting.calls)
        layer.backward(np.ones_like(x))
        layer.eval()
        layer(x)  # eval: local, no communication
        return after_forward, list(counting.calls)

    for after_forward, calls in world.run(fn):
        assert after_forward == ["allgather"]
        assert calls == ["allgather", "allgather"]


def test_world_of_one_and_none_communicate_nothing():
    counting = CountingComm(ThreadWorld(1).comm(0))
    x = np.random.default_rng(0).standard_normal((5, 3))
    for comm in (None, counting):
        layer = bn.SyncBatchNorm(3, comm=comm)
        y = layer(x)
        layer.backward(np.ones_like(y))
        np.testing.assert_allclose(y, bn.batch_norm(x, None, None, training=True), atol=1e-6)
    assert counting.calls == []


def test_bad_input_on_one_rank_raises_on_every_rank_without_hanging():
    world = ThreadWorld(3, timeout=10)

    def fn(comm, rank):
        layer = bn.SyncBatchNorm(3, comm=comm)
        x = np.ones((4, 2 if rank == 1 else 3), np.float32)  # rank 1 has the wrong C
        before = to_numpy(layer.running_mean)
        try:
            layer(x)
        finally:
            np.testing.assert_array_equal(to_numpy(layer.running_mean), before)

    results = world.run(fn)
    assert all(isinstance(r, ValueError) for r in results), results
    assert "num_features" in str(results[1])
    assert "rank(s) [1]" in str(results[0]) and "rank(s) [1]" in str(results[2])


def test_too_few_values_globally_raises_on_every_rank():
    world = ThreadWorld(2)
    results = world.run(lambda comm, rank: bn.SyncBatchNorm(2, comm=comm)(
        np.ones((1 if rank == 0 else 0, 2), np.float32)))
    assert all(isinstance(r, ValueError) and "more than 1 value" in str(r) for r in results)


def test_comm_type_is_checked():
    with pytest.raises(TypeError, match="comm must be"):
        bn.SyncBatchNorm(3, comm=object())


def _mpiexec() -> str:
    """The ``mpiexec`` next to this interpreter (the MPICH wheel's) or on PATH; skips without
    mpi4py or mpiexec (fails in the tox env ``mpi``)."""
    needs("mpi4py", "mpi", "mpi4py is not installed (tox env 'mpi' has it)")
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if found is None:
        requirement("mpi", "no mpiexec next to the interpreter or on PATH")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("size", [2, 3, 4])
def test_real_processes_under_mpiexec(size):
    mpiexec = _mpiexec()
    script = Path(__file__).with_name("mpi_sync_check.py")
    env = {**os.environ, "PYTHONPATH": str(script.parents[1])}
    proc = subprocess.run([mpiexec, "-n", str(size), sys.executable, str(script)],
                          capture_output=True, text=True, timeout=240, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"\nmpiexec -n {size}: {proc.stdout.strip()}")
    # mpiexec may merge the ranks' lines, so match the reports rather than lines.
    reports = re.findall(r"rank (\d+) of (\d+): ok \((\d+) checks\)", proc.stdout)
    assert sorted(int(r) for r, _, _ in reports) == list(range(size)), proc.stdout
    assert all(int(n) == size and int(k) > 0 for _, n, k in reports), proc.stdout


@pytest.mark.slow
def test_example_trains_identically_on_one_and_three_processes():
    mpiexec = _mpiexec()
    script = Path(__file__).parents[1] / "examples" / "sync_data_parallel.py"
    finals = []
    for n in (1, 3):
        proc = subprocess.run([mpiexec, "-n", str(n), sys.executable, str(script)],
                              capture_output=True, text=True, timeout=240, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        final = re.search(r"final accuracy on all data (.*)", proc.stdout)
        assert final, proc.stdout
        finals.append(final.group(1))
    assert finals[0] == finals[1]

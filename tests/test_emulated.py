"""Self-tests of the CPU execution target (tests/emulated): CUDA semantics it models, the bugs it
must make loud (planted in a copy of kernels/), and CuPy's host/device rules.

They run in the tox env ``emulated`` (``BNCUPY_EMULATED=1``), which also runs the whole suite on
the emulator; the planted bugs build the kernels several times, so other runs skip them.
"""

from __future__ import annotations

import ctypes
import re
import shutil
from contextlib import contextmanager

import numpy as np
import pytest

import bncupy as bn
from bncupy._kernels import kernel_dir
from bncupy.backends import cupy as cupy_backend
from tests.conftest import EMULATED
from tests.emulated import EmulatedRuntime, KernelFault, device
from tests.emulated.build import HERE, build

pytestmark = pytest.mark.skipif(not EMULATED, reason="the CPU execution target's self-tests run "
                                                    "in tox env 'emulated' (BNCUPY_EMULATED=1)")

PROBES = [f"shuffle_probe<{k}>" for k in range(4)] + [
    "shuffle_after_exit", "barrier_shuffle_deadlock", "barrier_after_exit", "block_order",
    "spin_on_other_block", "read_unwritten_shared", "write_past_end", "axpb",
    "dynamic_shared_neighbours"]


@pytest.fixture(scope="module")
def probes():
    return EmulatedRuntime(library=build(PROBES, HERE / "probes", ["probes.cu"], ""), seed=1)


def _launch(rt, name, grid, block, *args, order="random", timeout=None, shared_mem=0):
    rt.order = order
    if timeout is not None:
        rt.timeout = timeout
    rt.kernel("", name)(grid, block, args, shared_mem=shared_mem)


# ------------------------------------------------------------------------------ CUDA semantics

@pytest.mark.parametrize("kind, arg, width", [(0, 1, 32), (0, 16, 32), (0, 5, 8), (1, 3, 32),
                                              (1, 2, 16), (2, 1, 32), (2, 16, 32), (2, 4, 8),
                                              (3, 7, 32), (3, 35, 32), (3, 3, 8)])
def test_shuffles_follow_the_hardware_rules(probes, kind, arg, width):
    out = device.empty(64, np.int32)
    _launch(probes, f"shuffle_probe<{kind}>", 1, 64, out, np.int32(arg), np.int32(width))
    lanes = np.arange(64) % 32
    seg = lanes // width * width
    if kind == 0:  # down: a source past the segment returns the caller's own value
        src = np.where(lanes % width + arg < width, lanes + arg, lanes)
    elif kind == 1:  # up
        src = np.where(lanes % width >= arg, lanes - arg, lanes)
    elif kind == 2:  # xor: a later segment returns the caller's own value
        src = np.where((lanes ^ arg) < seg + width, lanes ^ arg, lanes)
    else:  # idx: modulo the width, within the segment
        src = seg + arg % width
    np.testing.assert_array_equal(out.get(), 100 * src)


def test_a_shuffle_naming_exited_lanes_is_an_error(probes):
    with pytest.raises(KernelFault, match="exited"):
        _launch(probes, "shuffle_after_exit", 1, 32, device.empty(32, np.int32))


def test_a_barrier_nobody_can_pass_is_reported_as_a_deadlock(probes):
    with pytest.raises(KernelFault, match="deadlock"):
        _launch(probes, "barrier_shuffle_deadlock", 1, 64, device.empty(64, np.int32))


def test_exited_threads_leave_barriers(probes):
    out = device.empty(32, np.int32)
    _launch(probes, "barrier_after_exit", 1, 64, out)
    np.testing.assert_array_equal(out.get(), 31 - np.arange(32))


def test_blocks_run_one_at_a_time_in_index_or_seeded_random_order(probes):
    orders = {}
    for order, seed in [("index", 0), ("random", 5), ("random", 5), ("random", 6)]:
        ticket, out = device.zeros(1, np.uint32), device.empty(200, np.uint32)
        probes.seed, probes.launches = seed, iter(range(10**6))
        _launch(probes, "block_order", 200, 32, ticket, out, order=order)
        orders.setdefault((order, seed), []).append(out.get())
    np.testing.assert_array_equal(orders["index", 0][0], np.arange(200))
    first, again = orders["random", 5]
    np.testing.assert_array_equal(first, again)  # seeded: reproducible
    assert sorted(first.tolist()) == list(range(200)) and (first != np.arange(200)).any()
    assert (orders["random", 6][0] != first).any()


def test_a_block_spinning_on_another_is_reported_as_hung(probes):
    with pytest.raises(KernelFault, match="hung"):
        _launch(probes, "spin_on_other_block", 2, 32, device.zeros(1, np.uint32), order="index",
                timeout=0.5)


def test_unwritten_shared_memory_reads_as_nan(probes):
    out = device.empty(256, np.float32)
    _launch(probes, "read_unwritten_shared", 1, 256, out)
    got = out.get()
    assert got[0] == 1.0 and np.isnan(got[1:]).all()


def test_dynamic_shared_memory_is_the_launchs_and_poisoned_before_each_block(probes):
    out = device.empty(3 * 64, np.float32)
    _launch(probes, "dynamic_shared_neighbours", 3, 64, out, shared_mem=64 * 4)
    got = out.get().reshape(3, 64)
    expected = np.arange(3)[:, None] * 1000 + (np.arange(1, 65) % 64)[None, :]
    np.testing.assert_array_equal(np.delete(got, 62, 1), np.delete(expected, 62, 1))
    assert np.isnan(got[:, 62]).all()  # float 63, unwritten: each block starts from poison


def test_writing_past_the_dynamic_shared_memory_is_caught(probes):
    with pytest.raises(KernelFault, match="past the launch's dynamic shared memory"):
        _launch(probes, "dynamic_shared_neighbours", 1, 64, device.empty(64, np.float32),
                shared_mem=32 * 4)


def test_dynamic_shared_memory_above_48_kb_needs_the_kernels_limit_raised():
    rt = EmulatedRuntime(library=build(PROBES, HERE / "probes", ["probes.cu"], ""), seed=1)
    kernel = rt.kernel("", "dynamic_shared_neighbours")
    out = device.empty(64, np.float32)
    with pytest.raises(KernelFault, match="exceed the kernel's limit of 49152"):
        kernel(1, 64, (out,), shared_mem=64 * 1024)
    with pytest.raises(KernelFault, match="beyond the device's 232448"):
        kernel.max_dynamic_shared_size_bytes = 232449
    kernel.max_dynamic_shared_size_bytes = 64 * 1024
    rt.kernel("", "dynamic_shared_neighbours")(1, 64, (out,), shared_mem=64 * 1024)  # per kernel
    assert out.get()[0] == 1.0
    with pytest.raises(KernelFault, match="exceed the kernel's limit of 65536"):
        kernel(1, 64, (out,), shared_mem=64 * 1024 + 4)


def test_writing_past_an_allocation_is_caught(probes):
    with pytest.raises(KernelFault, match="wrote past the end"):
        _launch(probes, "write_past_end", 1, 64, device.empty(10, np.float32), np.uint32(10))


@pytest.mark.parametrize("bad, error", [
    ({"n": 10}, "Python int is passed as i64 but the parameter is u32"),
    ({"a": 2.0}, "Python float is passed as f64 but the parameter is f32"),
    ({"n": np.int32(10)}, "is u32 but got int32"),
    ({"out": "float64"}, "points to f32 elements"),
    ({"out": "strided"}, "not C-contiguous"),
    ({"extra": True}, "takes 5 arguments"),
])
def test_kernel_arguments_are_checked_against_the_parameter_types(probes, bad, error):
    args = {"in": device.zeros(10, np.float32), "out": device.empty(10, np.float32),
            "n": np.uint32(10), "a": np.float32(2), "b": 1.5}
    if bad.get("out") == "float64":
        args["out"] = device.empty(10, np.float64)
    elif bad.get("out") == "strided":
        args["out"] = device.empty(20, np.float32)[::2]
    else:
        args.update({k: v for k, v in bad.items() if k != "extra"})
    values = tuple(args.values()) + ((np.uint32(1),) if "extra" in bad else ())
    with pytest.raises(KernelFault, match=re.escape(error)):
        _launch(probes, "axpb", 1, 32, *values)


def test_valid_arguments_run(probes):
    x = device.asarray(np.arange(10, dtype=np.float32))
    out = device.empty(10, np.float32)
    _launch(probes, "axpb", 1, 32, x, out, np.uint32(10), np.float32(2), 1.5)  # float -> double
    np.testing.assert_array_equal(out.get(), 2 * np.arange(10) + 1.5)


def test_host_arrays_are_refused_as_kernel_arguments(probes):
    with pytest.raises(TypeError, match="Unsupported type"):
        _launch(probes, "axpb", 1, 32, np.zeros(10, np.float32), device.empty(10, np.float32),
                np.uint32(10), np.float32(2), 1.5)


def test_software_float16_conversions_are_bit_exact():
    lib = ctypes.CDLL(str(build(PROBES, HERE / "probes", ["probes.cu"], "")))
    halves = np.arange(65536, dtype=np.uint16)
    floats = np.empty(65536, np.float32)
    lib.bncupy_emu_half_to_float(halves.ctypes.data_as(ctypes.c_void_p),
                                 floats.ctypes.data_as(ctypes.c_void_p), ctypes.c_longlong(65536))
    ref = halves.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(floats.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])
    assert np.isnan(floats[nan]).all()
    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32),
                           np.arange(0x33000000 - 64, 0x38800000 + 64, 97, dtype=np.uint32),
                           np.arange(0x477FE000, 0x47801000, dtype=np.uint32),
                           ref.view(np.uint32)])
    x = np.concatenate([bits, bits | 0x80000000]).view(np.float32)
    out = np.empty(x.size, np.uint16)
    lib.bncupy_emu_float_to_half(x.ctypes.data_as(ctypes.c_void_p),
                                 out.ctypes.data_as(ctypes.c_void_p), ctypes.c_longlong(x.size))
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(out[~nan], expected[~nan])
    assert (out[nan] == 0x7FFF).all()  # PTX's canonical NaN


# ------------------------------------------------------------------------------ CuPy's rules

def test_device_arrays_follow_cupys_host_device_rules():
    d = device.asarray(np.arange(3.0))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(d)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.testing.assert_allclose(d, [0, 1, 2])
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for fill"):
        d[...] = np.ones(3)
    with pytest.raises(TypeError, match="Unsupported type"):
        d + np.ones(3)
    with pytest.raises(TypeError, match="Unsupported type"):
        device.concatenate([d, np.ones(3)])
    assert not isinstance(d, np.ndarray) and cupy_backend.runtime() is not None
    d[...] = np.float64(7.0)  # scalars are fine
    d[1:] = device.asarray(np.array([1.0, 2.0]))
    np.testing.assert_array_equal(d.get(), [7.0, 1.0, 2.0])
    assert isinstance(d * 2, device.ndarray) and isinstance(d.sum(), device.ndarray)
    assert float(d.sum()) == 10.0


def test_fresh_device_memory_is_nan_and_aligned():
    e = device.empty((3, 5), np.float32)
    assert np.isnan(e.get()).all() and e.data.ptr % 256 == 0
    assert (device.zeros(4, np.float16).get() == 0).all()


# ------------------------------------------------------------------------------ planted bugs

# (name, file, original text, mutated text): each bug must make the kernels fail here.
MUTANTS = [
    ("wrong shuffle offset", "welford.cuh", "for (int offset = 16; offset > 0;",
     "for (int offset = 8; offset > 0;"),
    ("missing __syncthreads", "welford.cuh",
     "    if (lane == 0) scratch[warp] = s;\n    __syncthreads();\n",
     "    if (lane == 0) scratch[warp] = s;\n"),
    ("last block by index", "welford.cuh", "is_last = (done == blocks - 1);",
     "is_last = (blockIdx.x % blocks == blocks - 1);"),
    ("no counter reset", "welford.cuh", "if (is_last) *counter = 0u;", ""),
    ("unwritten shared memory", "welford.cuh",
     "s = (lane < (int)(blockDim.x >> 5)) ? scratch[lane] : identity;", "s = scratch[lane];"),
    ("wrong grid stride", "reduce.cuh",
     "for (I j = first; j < body; j += stride) op.template run<V>(lead + j * V);",
     "for (I j = first; j < body; j += 2 * stride) op.template run<V>(lead + j * V);"),
    ("write past the end", "reduce.cuh", "const I singles = lead + (total - tail);",
     "const I singles = lead + (total - tail) + 1;"),
]


@contextmanager
def _runtime(rt):
    previous = cupy_backend.set_runtime(rt)
    try:
        yield rt
    finally:
        cupy_backend.set_runtime(previous)


def _exercise(rt):
    """Training forward twice on one stream (the second finds the counters the first left),
    eval, fused, backward, on geometries with one and several splits per channel and with
    grid-stride loops; every output against the NumPy backend."""
    xp = rt.xp
    for sms in (1, 1000):
        rt.sms = sms
        for shape, axis in [((16, 4, 48, 48), 1), ((64, 12, 12, 16), -1), ((8, 3, 5, 5), 1)]:
            x = (np.random.default_rng(0).standard_normal(shape) * 2 + 3).astype(np.float32)
            dy = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
            ref_y, ref_m, ref_s = bn.batch_norm_forward(x, None, None, training=True, axis=axis)
            ref_dx = bn.batch_norm_backward(dy, x, None, ref_m, ref_s, axis=axis)[0]
            for _ in range(2):
                y, m, s = bn.batch_norm_forward(xp.asarray(x), None, None, training=True,
                                                axis=axis)
                np.testing.assert_allclose(y.get(), ref_y, atol=1e-4)
            relu = bn.batch_norm(xp.asarray(x), None, None, training=True, axis=axis,
                                 activation="relu")
            np.testing.assert_allclose(relu.get(), np.maximum(ref_y, 0), atol=1e-4)
            dx = bn.batch_norm_backward(xp.asarray(dy), xp.asarray(x), None, m, s, axis=axis)[0]
            np.testing.assert_allclose(dx.get(), ref_dx, atol=1e-4)


def _library(tmp_path, mutant=None):
    src = tmp_path / "kernels"
    shutil.copytree(kernel_dir(), src)
    if mutant is not None:
        _, file, before, after = mutant
        text = (src / file).read_text()
        assert text.count(before) == 1, f"mutant {mutant[0]!r} no longer applies to {file}"
        (src / file).write_text(text.replace(before, after))
    return build(cupy_backend.name_expressions(("float32",)), src)


def test_the_unmutated_kernels_pass_the_mutant_workload(tmp_path):
    with _runtime(EmulatedRuntime(library=_library(tmp_path), order="random", seed=3)) as rt:
        _exercise(rt)


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_a_planted_kernel_bug_fails(tmp_path, mutant):
    rt = EmulatedRuntime(library=_library(tmp_path, mutant), order="random", seed=3)
    with _runtime(rt), pytest.raises((KernelFault, AssertionError)):
        _exercise(rt)

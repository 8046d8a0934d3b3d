"""``benchmarks/host_overhead.py`` runs and reports what it says: every op of the launch budget,
its counts through the seam, and bncupy's own time as the whole less the null runtime's
stand-ins for CuPy (their cost timed in the same blocks). No speed is asserted here: the
figures are the benchmark's to report (README, docs/guide/gpu.md)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bncupy as bn

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "host_overhead.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("host_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# launches and allocations per call (the budget of tests/test_hot_path.py, as the table shows it)
COUNTS = {
    "batch_norm train": (2, 1), "batch_norm eval": (1, 1), "batch_norm_backward": (2, 3),
    "BatchNorm2d fwd+bwd": (4, 4), "BatchNorm2d relu+residual fwd+bwd": (4, 5),
    "group_norm_backward": (3, 3), "instance_norm_backward": (3, 3),
}


def test_device_table_covers_every_op_and_subtracts_only_the_stand_ins():
    rows, allocation, launch = _benchmark().device_table(bn, 100, 5)
    names = [row[0] for row in rows]
    for layout in ("NCHW", "NHWC"):
        for op in (*COUNTS, "group_norm", "instance_norm", "GroupNorm fwd+bwd",
                   "InstanceNorm2d affine fwd+bwd"):
            assert f"{op} {layout}" in names
    assert {"layer_norm (8192, 1024)", "layer_norm_backward (8192, 1024)",
            "LayerNorm fwd+bwd (8192, 1024)", "RMSNorm fwd+bwd (8192, 1024)"} <= set(names)
    assert 0 < launch and 0 < allocation
    for name, wall, cpu, lo, hi, stand_ins, launches, allocations, ops in rows:
        op = name.rsplit(" ", 1)[0]
        if op in COUNTS:
            assert (launches, allocations) == COUNTS[op], name
        step = "fwd+bwd" in name  # a layer's forward and backward: each within the budget
        assert launches <= (6 if step else 3) and ops == 0, name
        assert allocations == (4 + ("relu" in name) - ("RMSNorm" in name) if step else
                               1 if "backward" not in name else 3), name
        assert lo <= wall <= hi
        assert stand_ins == pytest.approx(allocations * allocation + launches * launch)
        assert 0 < stand_ins < cpu, name  # the op's time holds its stand-ins and bncupy's own


def test_script_prints_both_tables():
    env = {**os.environ, "GLIBC_TUNABLES": _benchmark()._TUNABLES}
    out = subprocess.run([sys.executable, str(SCRIPT), "--calls", "20", "--blocks", "1"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
                         check=True).stdout
    assert "Stand-ins for CuPy, CPU us each: allocation" in out
    assert "| op (null runtime) |" in out and "| bncupy's own CPU us |" in out
    assert "| BatchNorm2d fwd+bwd NCHW |" in out
    assert "| op (NumPy backend, tiny tensor) |" in out
    assert "| layer_norm (4, 16) |" in out

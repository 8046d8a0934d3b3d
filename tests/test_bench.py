"""The GPU record's digest and summary, checked without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bncupy import _bench
from bncupy._kernels import kernels_digest

SHARED_TOOL = Path(__file__).resolve().parents[2] / "shared" / "tools" / "kernels_digest.py"


@pytest.mark.skipif(not SHARED_TOOL.is_file(), reason="shared/tools/kernels_digest.py not beside")
def test_digest_matches_the_shared_tool():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(SHARED_TOOL), str(root)], capture_output=True,
                         text=True, check=True).stdout
    assert out.splitlines()[0] == f"kernels {kernels_digest()}"


def test_digest_changes_with_any_kernel_byte(tmp_path):
    (tmp_path / "a.cu").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.cuh").write_text("y")
    (tmp_path / "notes.txt").write_text("ignored")
    first = kernels_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("still ignored")
    assert kernels_digest(tmp_path) == first
    (tmp_path / "sub" / "b.cuh").write_text("z")
    assert kernels_digest(tmp_path) != first


def test_summary_geomeans_and_roofline():
    rows = [
        {"op": "fwd_train", "layout": "NCHW", "dtype": "float32", "shape": [256, 64, 56, 56],
         "bncupy_us": 100.0, "torch_us": 200.0, "cupy_naive_us": 800.0, "roofline_fraction": 0.9},
        {"op": "fwd_train", "layout": "NCHW", "dtype": "float32", "shape": [32, 64, 7, 7],
         "bncupy_us": 10.0, "torch_us": 10.0, "cupy_naive_us": 20.0, "roofline_fraction": 0.1},
    ]
    s = _bench.summarize(rows)
    assert s["fwd_train_NCHW_vs_torch_geomean"] == pytest.approx(2 ** 0.5, rel=1e-3)
    assert s["fwd_train_NCHW_vs_naive_geomean"] == pytest.approx(4.0, rel=1e-3)
    assert s["fwd_train_NCHW_roofline_median_ge_64MB"] == 0.9


def test_program_source_names_the_kernels_digest():
    # CuPy caches compiled modules by source text; the digest makes edited kernels recompile.
    from bncupy.backends import cupy as cupy_backend

    source = cupy_backend.program_source()
    assert kernels_digest() in source
    assert '#include "forward.cu"' in source and '#include "backward.cu"' in source

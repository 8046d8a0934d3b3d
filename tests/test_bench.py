"""The GPU record's digest and summary, checked without a GPU."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bncupy import _bench
from bncupy._kernels import kernel_dir, kernels_digest
from tests.conftest import requires_gpu


def _record_digest(base: Path) -> str:
    """The GPU record's kernels_digest as the design notes (section 4) specify it, written here
    independently of bncupy's own: sha256 over kernels/**/*.cu, *.cuh, *.h in sorted POSIX
    relative path order, feeding for each the path, NUL, the bytes, NUL."""
    files = sorted((p.relative_to(base).as_posix(), p) for p in base.rglob("*")
                   if p.is_file() and p.suffix in (".cu", ".cuh", ".h"))
    return hashlib.sha256(b"".join(rel.encode() + b"\0" + p.read_bytes() + b"\0"
                                   for rel, p in files)).hexdigest()


def test_digest_follows_the_record_spec(tmp_path):
    for rel, text in [("b.cu", "1"), ("a/z.cuh", "2"), ("a/y.h", "3"), ("a.txt", "4")]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    expected = hashlib.sha256(b"a/y.h\x003\x00a/z.cuh\x002\x00b.cu\x001\x00").hexdigest()
    assert _record_digest(tmp_path) == expected == kernels_digest(tmp_path)
    assert kernels_digest() == _record_digest(kernel_dir())


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


def test_family_configs_cover_the_transformer_and_groupnorm_shapes():
    configs = _bench.family_configs()
    hidden = {shape[-1] for norm, _, shape in configs if norm == "layer_norm"}
    assert hidden == {768, 1024, 4096, 8192}
    assert all(shape[1] % 32 == 0 for norm, _, shape in configs if norm == "group_norm")
    assert {dtype for _, dtype, _ in configs} == {"float32", "float16"}


@requires_gpu
def test_family_rows_run_end_to_end_with_a_given_timer(monkeypatch):
    """The rows' code path on the CuPy backend (the CPU execution target when no GPU): every op
    runs and the row format holds; timings come from the timer passed in."""
    from bncupy.backends import cupy as cupy_backend

    calls = []

    def timer(xp, fn, reps):
        fn()
        calls.append(reps)
        return 1.0

    small = [("layer_norm", "float32", (64, 768)), ("group_norm", "float16", (2, 64, 6, 6))]
    monkeypatch.setattr(_bench, "family_configs", lambda quick=False: small)
    rows = _bench.family_rows(cupy_backend.require(), None, 1, timer=timer)
    assert len(rows) == 4 and len(calls) == 4
    assert {r["op"] for r in rows} == {"fwd", "fwd_bwd"} and all(r["torch_us"] is None
                                                                for r in rows)

"""``bncupy gpu-check`` rehearsed on the CPU execution target: every phase's code path runs (the
suite subset, the streams checks, the bench with the real timers on the target's events) and
the record has the design notes' fields (section 4). Sanitizers need a GPU: "not available"."""

from __future__ import annotations

import json

import pytest

from bncupy import _gpu_check
from bncupy._kernels import kernels_digest
from tests.conftest import EMULATED

pytestmark = pytest.mark.skipif(not EMULATED, reason="rehearses on the CPU execution target "
                                                     "(tox -e emulated)")

ROW_FIELDS = {"op", "layout", "dtype", "shape", "bncupy_us", "bncupy_device_us",
              "bncupy_host_us", "torch_us", "torch_host_us", "torch_native_us",
              "cupy_naive_us", "roofline_fraction"}


def test_the_prepared_command_runs_every_phase_and_writes_the_record(tmp_path):
    status = _gpu_check.main(tmp_path, rehearse=True)
    records = list(tmp_path.glob("gpu-*.json"))
    assert status == 0 and len(records) == 1
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back
    record = json.loads(records[0].read_text())
    assert record["kernels_digest"] == kernels_digest()
    for field in ("commit", "date", "device", "versions", "suite", "copy_bandwidth_GBps",
                  "bench", "phases", "summary", "fused"):
        assert field in record, field
    assert record["suite"]["failed"] == 0 and record["suite"]["passed"] > 0
    phases = record["phases"]
    assert phases["sanitizer"]["outcome"] == "not available"
    assert {name: c["outcome"] for name, c in phases["streams"]["checks"].items()} == {
        "threads on separate streams": "pass", "CUDA graph of a layer step": "pass",
        "threads on the per-thread default stream": "pass"}
    rows = record["bench"]
    assert rows and all(set(r) == ROW_FIELDS for r in rows)
    assert {r["op"] for r in rows} == {"fwd_train", "fwd_eval", "bwd"}
    assert all(r["bncupy_device_us"] is not None for r in rows)  # captured in a CUDA graph
    transformer = record["transformer"]  # RMSNorm, add + RMSNorm / LayerNorm, both dtypes
    assert {(r["norm"], r["op"], r["dtype"]) for r in transformer} == {
        (norm, op, dtype) for norm in ("rms", "add_rms", "add_ln") for op in ("fwd", "bwd")
        for dtype in ("bfloat16", "float16")}
    assert all(r["bncupy_device_us"] is not None and r["roofline_fraction"] is not None
               for r in transformer)
    assert "GPU record:" in (tmp_path / "summary.txt").read_text()


def test_a_phase_over_its_limit_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(_gpu_check.LIMITS, "streams", 0.01)
    status = _gpu_check.main(tmp_path, phases=["env", "streams", "bench"], rehearse=True)
    record = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    assert status == 1
    assert any(run["timed_out"] for run in record["phases"]["streams"]["runs"])
    assert record["phases"]["bench"]["ok"] and record["bench"]

"""``bncupy demo --quick``: files, schema, the paper's claim, determinism."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("sklearn", reason="the demo extra (scikit-learn, matplotlib) is not installed")
pytest.importorskip("matplotlib", reason="the demo extra is not installed")

FILES = {"summary.json", "history.json", "accuracy.png", "sigmoid_percentiles.png",
         "distributions.png"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "bncupy", "demo", "--quick", "--out", str(out),
                           "--seed", "0"], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_writes_every_file(quick_run):
    out, _ = quick_run
    assert FILES <= {p.name for p in out.iterdir()}
    for name in FILES - {"summary.json", "history.json"}:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_schema(quick_run):
    summary = json.loads((quick_run[0] / "summary.json").read_text())
    assert set(summary) == {"target_accuracy", "arms"}
    assert isinstance(summary["target_accuracy"], float)
    assert len(summary["arms"]) == 6
    for arm in summary["arms"]:
        assert set(arm) == {"name", "batch_norm", "lr", "steps_to_target", "final_test_accuracy"}
        assert isinstance(arm["name"], str) and isinstance(arm["batch_norm"], bool)
        assert isinstance(arm["lr"], float) and 0.0 <= arm["final_test_accuracy"] <= 1.0
        assert arm["steps_to_target"] is None or isinstance(arm["steps_to_target"], int)


def test_bn_reaches_target_in_fewer_steps_at_the_same_learning_rate(quick_run):
    arms = json.loads((quick_run[0] / "summary.json").read_text())["arms"]
    pairs = {}
    for arm in arms:
        pairs.setdefault((arm["name"].split("+")[0].split()[0], arm["lr"]), {})[
            arm["batch_norm"]] = arm
    assert len(pairs) == 3
    for pair in pairs.values():
        with_bn, without = pair[True], pair[False]
        assert with_bn["steps_to_target"] is not None
        assert without["steps_to_target"] is None or \
            with_bn["steps_to_target"] < without["steps_to_target"]


def test_verdict_printed(quick_run):
    assert "trained faster" in quick_run[1]


def test_deterministic_for_a_seed(tmp_path, quick_run):
    from bncupy import demo

    demo.run(tmp_path, quick=True, seed=0)
    for name in ("summary.json", "history.json"):
        assert (tmp_path / name).read_text() == (quick_run[0] / name).read_text()

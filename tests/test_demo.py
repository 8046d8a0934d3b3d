"""``bncupy demo --quick``: files, schema, the paper's claim, determinism, BLAS threads, the
timings it states."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs

needs("sklearn", "demo", "the demo extra (scikit-learn, matplotlib) is not installed")
needs("matplotlib", "demo", "the demo extra is not installed")

FILES = {"summary.json", "history.json", "accuracy.png", "sigmoid_percentiles.png",
         "distributions.png", "explorer.html"}
PNGS = {name for name in FILES if name.endswith(".png")}
DEMO_PAGE = Path(__file__).resolve().parents[1] / "docs" / "guide" / "demo.md"


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
    for name in PNGS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "explorer.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and 'id="curves"' in page


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


def test_verdict_and_own_timing_printed(quick_run):
    assert "trained faster" in quick_run[1]
    assert re.search(r"in \d+\.\d s \(\d+\.\d s of CPU\) on the numpy backend with 1 BLAS thread",
                     quick_run[1])


def test_history_resolves_the_first_steps(quick_run):
    """The figures put steps on a log axis: the first decade must have points of its own."""
    history = json.loads((quick_run[0] / "history.json").read_text())
    for arm in history["arms"]:
        assert arm["steps"][:5] == [1, 2, 3, 4, 5]
        assert arm["steps"] == sorted(set(arm["steps"])) and arm["steps"][-1] == 600
        assert len(arm["test_accuracy"]) == len(arm["steps"])


def test_matrix_products_run_on_one_blas_thread(monkeypatch, tmp_path):
    from threadpoolctl import threadpool_info

    from bncupy import demo

    def blas_threads(pools):
        return [pool["num_threads"] for pool in pools if pool["user_api"] == "blas"]

    before = blas_threads(threadpool_info())
    monkeypatch.setattr(demo, "_run", lambda *args: threadpool_info())
    inside = blas_threads(demo.run(tmp_path))
    assert inside and set(inside) == {demo.BLAS_THREADS} == {1}
    assert blas_threads(threadpool_info()) == before  # the caller's setting is restored


def test_help_and_the_demo_page_state_the_same_measured_timings():
    from bncupy import demo

    help_text = subprocess.run([sys.executable, "-m", "bncupy", "demo", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert " ".join(demo.MEASURED_TIMINGS.split()) in " ".join(help_text.split())
    assert " ".join(demo.MEASURED_TIMINGS.split()) in " ".join(DEMO_PAGE.read_text().split())


def test_deterministic_for_a_seed(tmp_path, quick_run):
    from bncupy import demo

    demo.run(tmp_path, quick=True, seed=0)
    for name in ("summary.json", "history.json", "explorer.html"):
        assert (tmp_path / name).read_text() == (quick_run[0] / name).read_text()

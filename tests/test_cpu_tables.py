"""The CPU tables of docs/guide/performance.md are what ``benchmarks/cpu.py --readme`` prints
from the two committed runs, cell for cell."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = [ROOT / "benchmarks" / "results" / "cpu" / f"2026-12-05-{i}.json" for i in (1, 2)]


def _rows(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("| ") and "×" in line]


def test_the_performance_pages_cpu_tables_are_the_committed_runs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu.py"), "--readme",
                          *map(str, RUNS)], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    printed = _rows(out)
    page = (ROOT / "docs" / "guide" / "performance.md").read_text()
    assert len(printed) == 18  # nine shapes and layouts, two engines
    assert _rows(page.split("## The first call")[0]) == printed
    for run in RUNS:
        assert run.name in page

"""Every ```python block of README.md and of the user guide (docs/**/*.md) runs as written, each
in a fresh interpreter.

A block that needs CuPy and a GPU, mpi4py (and ``mpiexec``) or torch is skipped where those are
missing, and fails instead in the tox env that requires them (``BNCUPY_REQUIRE``: ``gpu``,
``mpi``, ``torch``); :func:`test_every_block_runs_in_some_tox_env` checks that such an env
exists and runs this file. Bash blocks are not run.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REAL_GPU_REASON, needs, requirement

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCUMENTS = [ROOT / "README.md", *sorted(path for path in (ROOT / "docs").rglob("*.md")
                                         if "_build" not in path.parts)]


def _python_blocks(path: Path) -> list[tuple[str, str]]:
    """``(where, code)`` of each ```python block of ``path``."""
    text = path.read_text(encoding="utf-8")
    return [(f"{path.relative_to(ROOT).as_posix()} line {text.count(chr(10), 0, m.start()) + 2}",
             m.group(1)) for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S)]


BLOCKS = [block for path in DOCUMENTS for block in _python_blocks(path)]


def _subject(code: str) -> str | None:
    """What ``code`` needs that not every environment has (a ``BNCUPY_REQUIRE`` subject)."""
    if re.search(r"^import cupy|^from cupy", code, re.M):
        return "gpu"
    if "mpi4py" in code:
        return "mpi"
    if re.search(r"^import torch|^from torch", code, re.M):
        return "torch"
    return None


def _require(subject: str | None) -> None:
    """Skip (or, where required, fail) unless what ``subject`` names is here."""
    if subject == "gpu" and REAL_GPU_REASON is not None:
        requirement("gpu", f"needs CuPy and a GPU: {REAL_GPU_REASON}")
    if subject == "mpi":
        needs("mpi4py", "mpi", "mpi4py is not installed (the tox env 'mpi' runs this block)")
    if subject == "torch":
        needs("torch", "torch", "torch is not installed (the tox env 'torch' runs this block)")


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_readme_has_the_blocks_this_test_knows_about():
    assert len(BLOCKS) >= 4
    assert any("bn.fold_into" in code for _, code in BLOCKS)  # the Quickstart
    assert {_subject(code) for _, code in BLOCKS} >= {None, "gpu", "mpi", "torch"}


def _tox_envs() -> dict[str, tuple[set[str], bool]]:
    """Each tox env's ``BNCUPY_REQUIRE`` subjects and whether its commands run this file."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "tox.ini")
    base = config["testenv"]
    envs = {}
    for section in config.sections():
        if not section.startswith("testenv:"):
            continue
        env = config[section]
        set_env = env.get("set_env", base.get("set_env", ""))
        match = re.search(r"BNCUPY_REQUIRE\s*=\s*(\S+)", set_env)
        subjects = set(match.group(1).split(",")) if match else set()
        commands = env.get("commands", base.get("commands", ""))
        runs = [line for line in commands.splitlines() if "pytest" in line]
        whole_suite = any("tests/" not in line for line in runs)
        envs[section.split(":", 1)[1]] = (subjects, whole_suite or "tests/test_readme.py" in
                                          commands)
    return envs


def test_every_block_runs_in_some_tox_env():
    envs = _tox_envs()
    for block, code in BLOCKS:
        subject = _subject(code)
        if subject is None:
            continue  # every env runs it
        where = [name for name, (subjects, runs) in envs.items() if subject in subjects and runs]
        assert where, (f"{block} needs {subject}: no tox env both requires it (BNCUPY_REQUIRE) "
                       f"and runs tests/test_readme.py")


@pytest.mark.parametrize("code", [code for _, code in BLOCKS],
                         ids=[where for where, _ in BLOCKS])
def test_readme_python_block_runs(code):
    _require(_subject(code))
    out = _run([sys.executable, "-c", code])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_readme_syncbatchnorm_block_under_mpiexec(tmp_path):
    from tests.test_sync import _mpiexec

    code = next(code for _, code in BLOCKS if "SyncBatchNorm" in code and "mpi4py" in code)
    script = tmp_path / "readme_sync.py"
    script.write_text(code)
    out = _run([_mpiexec(), "-n", "2", sys.executable, str(script)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_install_lines_work_without_a_registry_release():
    """bncupy is not on PyPI: every install line installs from the checkout."""
    assert not re.search(r"pip install [\"']?bncupy", README)
    assert re.search(r"pip install \.\s", README)


def _table_rows(text: str, header: str) -> dict[str, list[str]]:
    """The rows of the markdown table that starts with ``header``, by their first cell."""
    start = text.index(header)
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_readme_host_cost_rows_are_the_gpu_guides():
    """The README's host-cost table is a selection of docs/guide/gpu.md's (same op, before,
    now, own and target cells), and its NumPy-against-torch table is the guide's, so the two
    cannot drift apart."""
    ours = _table_rows(README, "| op (null runtime) | before µs | now µs | bncupy's own µs |")
    guide = _table_rows((ROOT / "docs" / "guide" / "gpu.md").read_text(encoding="utf-8"),
                        "| op (null runtime) | before µs (L·A·O) |")
    assert len(ours) >= 5
    for op, (before, now, own, target) in ours.items():
        # before (L·A·O), start, now, stand-ins, own, now L·A·O, target
        full = guide[op]
        assert (before, now, own, target) == (full[0].split()[0], full[2], full[4],
                                              full[6]), op
    numpy_header = "| op (NumPy backend, tiny tensor) | bncupy µs | torch CPU eager µs |"
    guide_text = (ROOT / "docs" / "guide" / "gpu.md").read_text(encoding="utf-8")
    assert _table_rows(README, numpy_header) == _table_rows(guide_text, numpy_header)

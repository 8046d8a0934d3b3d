"""Every ```python block of README.md and of the user guide (docs/**/*.md) runs as written, each
in a fresh interpreter.

Blocks that need CuPy and a GPU, or mpi4py, are skipped with the reason where those are missing
(the GPU suite and the tox env 'mpi' run them); bash blocks are not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REAL_GPU_REASON

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


def _mpi4py_missing() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (the tox env 'mpi' runs this block)"
    return None


def _needs(code: str) -> str | None:
    """Why ``code`` cannot run here, or None."""
    if re.search(r"^import cupy|^from cupy", code, re.M) and REAL_GPU_REASON is not None:
        return f"needs CuPy and a GPU: {REAL_GPU_REASON}"
    if "mpi4py" in code:
        return _mpi4py_missing()
    if re.search(r"^import torch|^from torch", code, re.M):
        try:
            import torch  # noqa: F401
        except ImportError:
            return "torch is not installed (the tox env 'torch' runs this block)"
    return None


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_readme_has_the_blocks_this_test_knows_about():
    assert len(BLOCKS) >= 4
    assert any("bn.fold_into" in code for _, code in BLOCKS)  # the Quickstart


@pytest.mark.parametrize("code", [code for _, code in BLOCKS],
                         ids=[where for where, _ in BLOCKS])
def test_readme_python_block_runs(code):
    reason = _needs(code)
    if reason:
        pytest.skip(reason)
    out = _run([sys.executable, "-c", code])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_readme_syncbatchnorm_block_under_mpiexec(tmp_path):
    code = next(code for _, code in BLOCKS if "SyncBatchNorm" in code and "mpi4py" in code)
    reason = _mpi4py_missing()
    if reason:
        pytest.skip(reason)
    local = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(local) if local.exists() else shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec on PATH")
    script = tmp_path / "readme_sync.py"
    script.write_text(code)
    out = _run([mpiexec, "-n", "2", sys.executable, str(script)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_install_lines_work_without_a_registry_release():
    """bncupy is not on PyPI: every install line installs from the checkout."""
    assert not re.search(r"pip install [\"']?bncupy", README)
    assert re.search(r"pip install \.\s", README)

"""Planted bugs in the NumPy backend, the reference every other result is judged by: each is
applied to a copy of the package, the tests that should catch it run on that copy in a
subprocess, and they must fail; on the unmutated copy they must pass.

The bugs sit on the large-input paths that small examples never take: the merges across tiles,
threads and row segments, and the coefficients of the apply and backward passes. Each is
anchored on a snippet of the backend's source that must occur exactly once: when a rewrite
removes it, the mutant's test fails and asks for a new anchor rather than passing vacuously.

They need both CPU engines and run in the tox env ``py313`` (``BNCUPY_MUTANTS=1``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

pytestmark = pytest.mark.skipif(not os.environ.get("BNCUPY_MUTANTS"),
                                reason="the NumPy backend's planted bugs run in tox env 'py313' "
                                       "(BNCUPY_MUTANTS=1)")

ROOT = Path(__file__).resolve().parents[1]
SCALE = "tests/test_scale.py"


class Mutant(NamedTuple):
    name: str
    path: str  # relative to the repository root
    anchor: str  # occurs exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest arguments selecting the tests that must catch it


MUTANTS = [
    Mutant("cross-tile gradient sums overwritten", "bncupy/backends/_ufuncs.py",
           "sum_g[lay.channels(tile)] += s", "sum_g[lay.channels(tile)] = s",
           (SCALE, "-k", "numpy-")),
    Mutant("cross-tile moments not merged", "bncupy/backends/_ufuncs.py",
           "count[ch], mean[ch], m2[ch] = merge((count[ch], mean[ch], m2[ch]), part)",
           "count[ch], mean[ch], m2[ch] = part", (SCALE, "-k", "numpy-")),
    Mutant("cross-tile moments of tiles over every channel not merged",
           "bncupy/backends/_ufuncs.py", "total = merge(total, part)", "total = part",
           (SCALE, "-k", "numpy-")),
    Mutant("periods layout: the leftover planes dropped", "bncupy/backends/_ufuncs.py",
           "+ self._spans(main * k * p, a - main * k, p, 1))", ")", (SCALE, "-k", "numpy-")),
    Mutant("last unit of the thread ranges dropped", "bncupy/backends/_pool.py",
           "bounds = [units * i // workers for i in range(workers + 1)]",
           "bounds = [units * i // workers for i in range(workers)] + [units - 1]",
           (SCALE, "-k", "numpy-")),
    Mutant("caller's thread range skipped", "bncupy/backends/_pool.py",
           "fn(bounds[0], bounds[1])", "fn(bounds[0], bounds[0])", (SCALE, "-k", "numba-")),
    Mutant("apply coefficient: rounded mean's correction of the wrong sign",
           "bncupy/backends/_common.py", "shift = -(mean - center) * scale",
           "shift = (mean - center) * scale", (SCALE, "-k", "numpy-")),
    Mutant("backward sums: centring correction of the wrong sign", "bncupy/backends/numpy.py",
           "return sum_dy, sum_dy_xc - (mean - center) * sum_dy",
           "return sum_dy, sum_dy_xc + (mean - center) * sum_dy", (SCALE, "-k", "numpy-")),
    Mutant("compiled row segments: the short last segment counted as full",
           "bncupy/backends/numpy.py", "counts[-1] = b - seg * (nseg - 1)",
           "counts[-1] = seg", (SCALE, "-k", "numba-")),
    Mutant("compiled row segments: gradient sums of a partial last segment misplaced",
           "bncupy/backends/_compiled.py",
           "def row_grad_sums(g2, x2, seg, channels, center, lo, hi, sum_g, sum_gx):\n"
           '    """Per row segment float64 ``sum(g)`` and ``sum(g * (x - center))``."""\n'
           "    nseg = (x2.shape[1] + seg - 1) // seg",
           "def row_grad_sums(g2, x2, seg, channels, center, lo, hi, sum_g, sum_gx):\n"
           '    """Per row segment float64 ``sum(g)`` and ``sum(g * (x - center))``."""\n'
           "    nseg = x2.shape[1] // seg",
           (SCALE, "-k", "numba-")),
    Mutant("compiled small rows: the centring's offset dropped from y",
           "bncupy/backends/_compiled.py",
           "v = ((np.float64(x2[i, j]) - pilot) - offset) * scale",
           "v = (np.float64(x2[i, j]) - pilot) * scale", (SCALE, "-k", "numba-")),
    Mutant("compiled merge across units: the spread of the unit means dropped",
           "bncupy/backends/_compiled.py",
           "out_m2[k] += m2[i, k] + delta * delta * n[k] * w", "out_m2[k] += m2[i, k]",
           (SCALE, "-k", "numba-")),
]


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    """A copy of the package and its tests (with Numba's cache, whose entries stay valid for
    every file the mutant leaves alone: it copies and restores modification times)."""
    root = tmp_path_factory.mktemp("mutated")
    for name in ("bncupy", "tests"):
        shutil.copytree(ROOT / name, root / name,
                        ignore=shutil.ignore_patterns(".hypothesis", "*.so", "*.o"))
    shutil.copy2(ROOT / "pyproject.toml", root)
    return root


def _pytest(root: Path, args: tuple[str, ...]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("BNCUPY_MUTANTS", "PYTHONPATH")}
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900, check=False)


def test_the_unmutated_copy_passes(copy):
    where = subprocess.run([sys.executable, "-c", "import bncupy; print(bncupy.__file__)"],
                           cwd=copy, capture_output=True, text=True, check=True).stdout
    assert Path(where.strip()).is_relative_to(copy), f"the copy is not imported: {where}"
    selections = {mutant.tests for mutant in MUTANTS}
    for args in sorted(selections):
        out = _pytest(copy, args)
        assert out.returncode == 0, f"{' '.join(args)} fails unmutated:\n{out.stdout[-3000:]}"


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_a_planted_bug_fails_the_tests(copy, mutant):
    path = copy / mutant.path
    text, stat = path.read_text(), path.stat()
    found = text.count(mutant.anchor)
    if found != 1:
        pytest.fail(f"mutant {mutant.name!r}: its anchor occurs {found} times in {mutant.path} "
                    f"(it must occur once); re-anchor it on the rewritten code:\n{mutant.anchor}")
    path.write_text(text.replace(mutant.anchor, mutant.replacement))
    try:
        out = _pytest(copy, mutant.tests)
    finally:
        path.write_text(text)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]
    assert out.returncode == 1 and re.search(r"\b1 failed\b", summary), (
        f"mutant {mutant.name!r} survived (pytest exit {out.returncode}: {summary}):\n"
        f"{out.stdout[-2000:]}{out.stderr[-2000:]}")

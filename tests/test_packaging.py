"""The kernel sources are found in a source checkout and in an installed (non-editable) wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import bncupy
from bncupy._kernels import kernel_dir, kernel_files, read_source

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"welford.cuh", "reduce.cuh", "forward.cu", "backward.cu"}


def test_loader_finds_every_kernel_source():
    names = {p.name for p in kernel_files()}
    assert EXPECTED <= names
    assert "struct Welford" in read_source("welford.cuh")
    # In a checkout the repository's kernels/ is used; installed, the wheel's bncupy/_kernels.
    pkg = Path(bncupy.__file__).resolve().parent
    assert kernel_dir() in (pkg / "_kernels", pkg.parent / "kernels")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("BNCUPY_TEST_WHEEL"),
                    reason="set BNCUPY_TEST_WHEEL=1 (the tox 'py312' env does) to build a wheel")
def test_wheel_ships_kernels_and_installed_loader_finds_them(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist),
                    str(ROOT)], check=True)
    wheel = next(dist.glob("bncupy-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True)
    probe = ("import bncupy, bncupy._kernels as k, pathlib; "
             "print(k.kernel_dir()); print(sorted(p.name for p in k.kernel_files())); "
             "print(pathlib.Path(bncupy.__file__).parent)")
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    found, names, package = out.stdout.splitlines()
    assert Path(found) == Path(package) / "_kernels"
    assert not Path(found).is_relative_to(ROOT)
    assert EXPECTED <= set(eval(names))  # noqa: S307 - our own printed list

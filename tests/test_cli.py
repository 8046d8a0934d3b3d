"""``bncupy info`` and ``python -m bncupy info``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bncupy import _cli
from tests.conftest import REAL_GPU_REASON


def test_info_reports_versions_backends_and_self_check(capsys):
    assert _cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and "backend numpy: available; self-check max error" in out
    assert "OK" in out
    assert "backend cupy:" in out


def test_self_check_detects_a_wrong_backend(monkeypatch):
    from bncupy import _functional
    from bncupy.backends import numpy as nb

    real = nb.apply
    monkeypatch.setattr(nb, "apply", lambda *a: real(*a) * 1.001)
    monkeypatch.setattr(nb, "SMALL_ELEMENTS", 0)  # the engines' unfused path, which calls apply
    monkeypatch.setattr(nb, "_fused_kernels", lambda *a: None)
    _functional._FORWARD_CHECKED.table.clear()  # plans made for the small path
    assert _cli.self_check("numpy") > 1e-6
    monkeypatch.undo()
    _functional._FORWARD_CHECKED.table.clear()
    train = nb.normalize_train  # any path: the small tensor's own included

    def wrong(*args, **kwargs):
        y, *rest = train(*args, **kwargs)
        return (y * 1.001, *rest)

    monkeypatch.setattr(nb, "normalize_train", wrong)
    assert _cli.self_check("numpy") > 1e-6


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "bncupy", "info"], capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("bncupy ")


def test_unknown_command_is_rejected():
    with pytest.raises(SystemExit):
        _cli.main(["frobnicate"])


@pytest.mark.skipif(REAL_GPU_REASON is None, reason="a GPU is present")
def test_bench_without_gpu_says_so(capsys, tmp_path, cuda_runtime):
    assert _cli.main(["bench", "--out", str(tmp_path)]) == 2
    assert "needs a GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_demo_without_its_extra_names_what_to_install(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # find_spec() now reports it missing
    assert _cli.main(["demo", "--quick", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'demo' extra" in err and "scikit-learn" in err and '".[demo]"' in err
    assert not (tmp_path / "out").exists()


def test_info_says_which_cpu_engine_runs_and_why(capsys, monkeypatch):
    from bncupy.backends import numpy as nb

    monkeypatch.delenv("BNCUPY_CPU_ENGINE", raising=False)
    engine, why = nb.engine_status()
    assert _cli.main(["info"]) == 0
    assert f"  cpu engine: {_cli.ENGINES[engine]}: {why}\n" in capsys.readouterr().out
    monkeypatch.setenv("BNCUPY_CPU_ENGINE", "numpy")
    assert _cli.main(["info"]) == 0
    assert ("cpu engine: numpy (pure-NumPy passes): BNCUPY_CPU_ENGINE=numpy turns the compiled "
            "engine off") in capsys.readouterr().out


def test_info_gives_the_readmes_cuda_install_line_not_a_pypi_name(capsys):
    """bncupy is not on PyPI: the hint is the README's install from a checkout."""
    from bncupy.backends import cupy as cupy_backend

    reason = cupy_backend.unavailable_reason()
    if reason is None or not reason.startswith("CuPy is not installed"):
        pytest.skip(f"CuPy is installed here ({reason or 'available'})")
    assert _cli.main(["info"]) == 0
    out = capsys.readouterr().out
    line = next(li for li in out.splitlines() if li.startswith("backend cupy"))
    assert line == f"backend cupy: unavailable: CuPy is not installed ({_cli.CUDA_INSTALL_HINT})"
    assert "bncupy[cuda" not in out
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    for extra in ("cuda12", "cuda13"):
        assert f'python3 -m pip install ".[{extra}]"' in readme
        assert f"'.[{extra}]'" in _cli.CUDA_INSTALL_HINT

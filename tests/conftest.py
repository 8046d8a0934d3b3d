"""Shared fixtures: Hypothesis profiles and the run's seed, the backend parametrisation,
requirements that a tox env turns from skips into failures, array helpers."""

from __future__ import annotations

import importlib
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import pytest
from hypothesis import HealthCheck, seed, settings

from bncupy.backends import cupy as cupy_backend
from tests.arrays import to_numpy

# "ci" replaces Hypothesis's own profile of that name (loaded when CI=true) with ours on top of it.
settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", parent=settings.get_profile("ci"), max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE",
                                     "ci" if os.environ.get("CI") else "dev"))

# Every run draws new examples; BNCUPY_TEST_SEED (printed in the header) draws a run's again.
SEED = int(os.environ.get("BNCUPY_TEST_SEED") or time.time_ns() % 2**32)

# BNCUPY_REQUIRE names what a tox env exists to test (comma-separated: nvrtc, mpi, torch, jax,
# demo, gpu): there, a test that would skip because its subject is missing fails instead. An env
# that expects the compiled CPU engine (BNCUPY_EXPECT_ENGINE=numba) requires numba.
REQUIRED = frozenset(part.strip() for part in os.environ.get("BNCUPY_REQUIRE", "").split(",")
                     if part.strip()) | (
    {"numba"} if os.environ.get("BNCUPY_EXPECT_ENGINE") == "numba" else set())


def requirement(subject: str, reason: str) -> NoReturn:
    """Skip the current test (or module) for ``reason``, or fail it where ``subject`` is
    required."""
    if subject in REQUIRED:
        pytest.fail(f"BNCUPY_REQUIRE={subject}, but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def needs(module: str, subject: str, reason: str) -> Any:
    """``import module``, or :func:`requirement` (skip, or fail where ``subject`` is required)
    if it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        requirement(subject, f"{reason} ({exc})")


def compiled_engine_missing() -> str | None:
    """Why the NumPy backend's compiled (Numba) engine does not load here, or None."""
    from bncupy.backends import numpy as nb

    try:
        if nb._load_compiled() is not None:
            return None
        importlib.import_module("bncupy.backends._compiled")  # the loader keeps the error
    except Exception as exc:
        return f"the compiled engine does not load: {exc!r}"
    return "the compiled engine does not load (bncupy.backends.numpy._load_compiled)"


def requires(subject: str, reason: str | None) -> pytest.MarkDecorator:
    """A mark that skips for ``reason`` (None: runs), or fails where ``subject`` is required."""
    if reason is not None and subject in REQUIRED:
        return pytest.mark.unmet_requirement(f"BNCUPY_REQUIRE={subject}, but {reason}")
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unmet_requirement(reason): fails the test (a subject "
                                       "BNCUPY_REQUIRE names is missing)")


def pytest_report_header(config: pytest.Config) -> str:
    return (f"bncupy test seed: {SEED} (BNCUPY_TEST_SEED={SEED} repeats this run's Hypothesis "
            f"examples); required: {', '.join(sorted(REQUIRED)) or 'nothing'}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("hypothesis_seed", None) is not None:
        return  # an explicit --hypothesis-seed wins
    for item in items:
        test = getattr(item, "obj", None)
        if getattr(test, "is_hypothesis_test", False):
            seed(SEED ^ zlib.crc32(f"{test.__module__}.{test.__qualname__}".encode()))(test)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("unmet_requirement"):
        pytest.fail(mark.args[0], pytrace=False)

# BNCUPY_EMULATED=1 (tox env "emulated"): the CuPy backend runs its kernels on the CPU, and every
# test that needs the CuPy backend runs there instead of skipping.
if os.environ.get("BNCUPY_EMULATED"):
    from tests import emulated

    emulated.install()

EMULATED = not isinstance(cupy_backend.runtime(), cupy_backend.CupyRuntime)
GPU_REASON = cupy_backend.unavailable_reason()
REAL_GPU_REASON = cupy_backend.CupyRuntime().unavailable_reason()
requires_gpu = requires("gpu", None if GPU_REASON is None else f"no GPU: {GPU_REASON}")
_REAL_GPU_MISSING = REAL_GPU_REASON or ("running on the CPU execution target" if EMULATED
                                         else None)
requires_real_gpu = requires("gpu", _REAL_GPU_MISSING and f"needs a real GPU: {_REAL_GPU_MISSING}")


@dataclass(frozen=True)
class Backend:
    """Creates arrays of one backend's kind and brings results back to NumPy."""

    name: str

    @property
    def xp(self) -> Any:
        return np if self.name == "numpy" else cupy_backend.require()

    def asarray(self, a: Any) -> Any:
        """``a`` in this backend's kind; a strided ``[..., ::2]`` view stays one on the GPU."""
        if self.name == "numpy" or a.flags.c_contiguous or a.ndim == 0:
            return self.xp.asarray(a)
        buf = self.xp.zeros((*a.shape[:-1], 2 * a.shape[-1]), a.dtype)
        buf[..., ::2] = self.xp.asarray(np.ascontiguousarray(a))
        return buf[..., ::2]

    to_numpy = staticmethod(to_numpy)


@pytest.fixture(scope="session",
                params=["numpy", pytest.param("cupy", marks=[requires_gpu, pytest.mark.gpu])])
def backend(request: pytest.FixtureRequest) -> Backend:
    return Backend(request.param)


@pytest.fixture
def cuda_runtime() -> Any:
    """The CuPy backend on its real runtime for one test (tests that fake CuPy's probe)."""
    previous = cupy_backend.set_runtime(cupy_backend.CupyRuntime())
    yield
    cupy_backend.set_runtime(previous)


NVRTC_REPORTS: list[str] = []  # filled by tests/test_nvrtc.py


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if NVRTC_REPORTS:
        terminalreporter.section("NVRTC register report (registers / spill bytes)")
        for line in sorted(NVRTC_REPORTS):
            terminalreporter.write_line(line)

"""Shared fixtures: Hypothesis profiles, the backend parametrisation, array helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from bncupy.backends import cupy as cupy_backend
from tests.arrays import to_numpy

# "ci" replaces Hypothesis's own profile of that name (loaded when CI=true) with ours on top of it.
settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", parent=settings.get_profile("ci"), max_examples=40, deadline=None,
                          derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE",
                                     "ci" if os.environ.get("CI") else "dev"))

# BNCUPY_EMULATED=1 (tox env "emulated"): the CuPy backend runs its kernels on the CPU, and every
# test that needs the CuPy backend runs there instead of skipping.
if os.environ.get("BNCUPY_EMULATED"):
    from tests import emulated

    emulated.install()

EMULATED = not isinstance(cupy_backend.runtime(), cupy_backend.CupyRuntime)
GPU_REASON = cupy_backend.unavailable_reason()
REAL_GPU_REASON = cupy_backend.CupyRuntime().unavailable_reason()
requires_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"no GPU: {GPU_REASON}")
requires_real_gpu = pytest.mark.skipif(
    REAL_GPU_REASON is not None,
    reason=f"needs a real GPU: {REAL_GPU_REASON or 'the CPU execution target is in use'}")
if EMULATED:
    requires_real_gpu = pytest.mark.skip(reason="needs a real GPU (running on the CPU execution "
                                                "target)")


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

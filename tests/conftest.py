"""Shared fixtures: Hypothesis profiles, the backend parametrisation, array helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from bncupy.backends import cupy as cupy_backend

# "ci" replaces Hypothesis's own profile of that name (loaded when CI=true) with ours on top of it.
settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", parent=settings.get_profile("ci"), max_examples=40, deadline=None,
                          derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE",
                                     "ci" if os.environ.get("CI") else "dev"))

GPU_REASON = cupy_backend.unavailable_reason()
requires_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"no GPU: {GPU_REASON}")


@dataclass(frozen=True)
class Backend:
    """Creates arrays of one backend's kind and brings results back to NumPy."""

    name: str

    @property
    def xp(self) -> Any:
        if self.name == "numpy":
            return np
        import cupy

        return cupy

    def asarray(self, a: Any) -> Any:
        """``a`` in this backend's kind; a strided ``[..., ::2]`` view stays one on the GPU."""
        if self.name == "numpy" or a.flags.c_contiguous or a.ndim == 0:
            return self.xp.asarray(a)
        buf = self.xp.zeros((*a.shape[:-1], 2 * a.shape[-1]), a.dtype)
        buf[..., ::2] = self.xp.asarray(np.ascontiguousarray(a))
        return buf[..., ::2]

    @staticmethod
    def to_numpy(a: Any) -> np.ndarray:
        return a.get() if hasattr(a, "get") else np.asarray(a)


@pytest.fixture(scope="session",
                params=["numpy", pytest.param("cupy", marks=[requires_gpu, pytest.mark.gpu])])
def backend(request: pytest.FixtureRequest) -> Backend:
    return Backend(request.param)


NVRTC_REPORTS: list[str] = []  # filled by tests/test_nvrtc.py


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if NVRTC_REPORTS:
        terminalreporter.section("NVRTC register report (registers / spill bytes)")
        for line in sorted(NVRTC_REPORTS):
            terminalreporter.write_line(line)

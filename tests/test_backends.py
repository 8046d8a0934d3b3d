"""Backend selection: environment variable, set/use_backend, context isolation, availability."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

import bncupy as bn
from bncupy.backends import _cuda, dispatch
from bncupy.backends import cupy as cupy_backend
from tests.conftest import REAL_GPU_REASON, needs, requires_gpu


@pytest.fixture(autouse=True)
def _restore_backend():
    before = dispatch._default
    yield
    dispatch._default = before


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, check=False)


@pytest.mark.parametrize("value, expected", [("numpy", "numpy"), ("NumPy", "numpy"),
                                             ("", "auto"), ("auto", "auto")])
def test_environment_variable_selects_the_default(value, expected):
    out = _run("from bncupy.backends import dispatch; print(dispatch.configured_backend())",
               BNCUPY_BACKEND=value)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_bad_environment_variable_names_it_and_lists_valid_names():
    out = _run("import bncupy, numpy; bncupy.moments(numpy.zeros((2, 2)))", BNCUPY_BACKEND="tpu")
    assert out.returncode != 0
    assert "BNCUPY_BACKEND" in out.stderr and "auto, numpy, cupy" in out.stderr


@pytest.mark.skipif(REAL_GPU_REASON is None, reason="CuPy can run here")
def test_environment_cupy_without_gpu_raises_on_use_never_falls_back():
    out = _run("import bncupy, numpy; bncupy.moments(numpy.zeros((2, 2)))", BNCUPY_BACKEND="cupy")
    assert out.returncode != 0
    assert "BackendUnavailableError" in out.stderr
    assert REAL_GPU_REASON in out.stderr


def test_set_and_get_backend():
    bn.set_backend("numpy")
    assert bn.get_backend() == "numpy"
    bn.set_backend("auto")
    assert bn.get_backend() == ("numpy" if cupy_backend.unavailable_reason() else "cupy")


def test_use_backend_is_scoped_and_restores_on_error():
    bn.set_backend("auto")
    with pytest.raises(RuntimeError), bn.use_backend("numpy"):
        assert dispatch.configured_backend() == "numpy"
        raise RuntimeError
    assert dispatch.configured_backend() == "auto"


def test_use_backend_is_local_to_threads_and_tasks():
    seen = {}
    barrier = threading.Barrier(2)

    def worker(name):
        with bn.use_backend(name):
            barrier.wait()
            seen[threading.current_thread().name] = dispatch.configured_backend()

    threads = [threading.Thread(target=worker, args=("numpy",), name="a"),
               threading.Thread(target=worker, args=("auto",), name="b")]
    with bn.use_backend("numpy"):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert dispatch.configured_backend() == "numpy"
    assert seen == {"a": "numpy", "b": "auto"}

    async def task(name):
        with bn.use_backend(name):
            await asyncio.sleep(0.01)
            return dispatch.configured_backend()

    async def main():
        return await asyncio.gather(task("numpy"), task("auto"))

    assert asyncio.run(main()) == ["numpy", "auto"]


def test_cupy_unavailable_error_says_what_is_missing_and_chains(monkeypatch, cuda_runtime):
    cause = ImportError("No module named 'cupy'")
    monkeypatch.setattr(_cuda, "_probe", lambda: ("CuPy is not installed (hint)", cause))
    with pytest.raises(bn.BackendUnavailableError, match="CuPy is not installed") as info:
        bn.set_backend("cupy")
    assert info.value.__cause__ is cause
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(bn.BackendUnavailableError), bn.use_backend("cupy"):
        pass
    with pytest.raises(bn.BackendUnavailableError):
        bn.BatchNorm2d(3).to("cupy")


def test_explicit_cupy_with_numpy_input_never_falls_back(monkeypatch, cuda_runtime):
    monkeypatch.setattr(_cuda, "_probe", lambda: ("no CUDA device is available", None))
    dispatch._default = "cupy"  # as if set while a device was present
    x = np.ones((4, 3))
    rm = np.zeros(3)
    with pytest.raises(bn.BackendUnavailableError, match="no CUDA device"):
        bn.batch_norm(x, rm, np.ones(3), training=True)
    assert (rm == 0).all()


def test_a_usable_cupy_runtime_is_not_probed_again(monkeypatch):
    """Once CuPy ran, a launch asks the runtime for the module, the device and the stream
    without probing or importing again (they are on every launch's path)."""
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDevice=lambda: 3),
                                      get_current_stream=lambda: "stream")
    monkeypatch.setitem(sys.modules, "cupy", fake)
    probes = []
    monkeypatch.setattr(_cuda, "_probe", lambda: probes.append(1) or (None, None))
    runtime = cupy_backend.CupyRuntime()
    assert runtime.require() is fake and runtime.xp is fake
    assert (runtime.device_id(), runtime.current_stream()) == (3, "stream")
    assert probes == [1]
    monkeypatch.setattr(_cuda, "_probe", lambda: ("no CUDA device is available", None))
    with pytest.raises(bn.BackendUnavailableError):  # a new runtime probes
        cupy_backend.CupyRuntime().require()


@pytest.mark.parametrize("driver, runtime, count_error, expected", [
    (0, 13000, RuntimeError("cudaErrorInsufficientDriver"), "no NVIDIA driver"),
    (12040, 13000, RuntimeError("cudaErrorInsufficientDriver"), "driver is too old"),
    (13000, 13000, RuntimeError("cudaErrorNoDevice"), "no CUDA device"),
])
def test_probe_distinguishes_driver_and_device(monkeypatch, driver, runtime, count_error,
                                              expected):
    cupy = needs("cupy", "gpu", "CuPy is not installed")
    rt = cupy.cuda.runtime

    def fail():
        raise count_error

    monkeypatch.setattr(rt, "getDeviceCount", fail)
    monkeypatch.setattr(rt, "driverGetVersion", lambda: driver)
    monkeypatch.setattr(rt, "runtimeGetVersion", lambda: runtime)
    _cuda._probe.cache_clear()
    try:
        reason, cause = _cuda._probe()
    finally:
        _cuda._probe.cache_clear()
    assert expected in reason and cause is count_error


def test_array_kind_classifies_without_importing_cupy():
    assert dispatch.array_kind(np.zeros(2)) == "numpy"
    assert dispatch.array_kind([1.0]) is None
    fake = type("ndarray", (), {"__module__": "cupy._core.core"})()
    assert dispatch.array_kind(fake) == "cupy"


@requires_gpu
def test_explicit_backends_return_the_callers_array_kind():
    cupy = cupy_backend.require()
    x = np.random.default_rng(0).standard_normal((8, 3, 4)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with bn.use_backend("cupy"):
        y = bn.batch_norm(x, rm, rv, training=True)
    assert isinstance(y, np.ndarray) and rm.any()
    xg = cupy.asarray(x)
    rmg, rvg = cupy.zeros(3, cupy.float32), cupy.ones(3, cupy.float32)
    with bn.use_backend("numpy"):
        yg = bn.batch_norm(xg, rmg, rvg, training=True)
    assert isinstance(yg, cupy.ndarray) and dispatch.array_kind(yg) == "cupy"
    np.testing.assert_allclose(cupy.asnumpy(yg), y, atol=1e-5)
    np.testing.assert_allclose(cupy.asnumpy(rmg), rm, atol=1e-6)
    with pytest.raises(TypeError, match="running_mean is a numpy.ndarray"):
        bn.batch_norm(xg, rm, rvg, training=True)

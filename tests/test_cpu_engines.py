"""Which CPU engine an install gets and why, where the compiled engine caches its code, the
pure-NumPy engine's tiling, and no NumPy warnings for the inf and NaN that the library handles.

``BNCUPY_EXPECT_ENGINE`` (set by tox: ``numba`` in the default envs, ``numpy`` in ``no-numba``)
names the engine the install under test must run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import bncupy as bn
import bncupy.backends
from bncupy.backends import _ufuncs
from bncupy.backends import numpy as nb

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(bn.__file__).resolve().parent
COMPILED = nb._load_compiled() is not None
needs_numba = pytest.mark.skipif(not COMPILED, reason="numba is not installed (the default tox "
                                                      "envs have it)")


@pytest.mark.skipif(not os.environ.get("BNCUPY_EXPECT_ENGINE"),
                    reason="BNCUPY_EXPECT_ENGINE is not set (tox sets it)")
def test_the_install_runs_the_engine_it_should(monkeypatch):
    monkeypatch.delenv("BNCUPY_CPU_ENGINE", raising=False)
    engine, why = nb.engine_status()
    assert engine == os.environ["BNCUPY_EXPECT_ENGINE"], why
    assert nb.engine().name == engine


def test_the_numba_dependency_is_where_numba_has_wheels():
    """The marker on the numba dependency, evaluated for the platforms whose wheels were checked
    (pip download numba --only-binary=:all: --platform ... --python-version ...)."""
    tomllib = pytest.importorskip("tomllib")
    markers = pytest.importorskip("packaging.requirements")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    numba = next(markers.Requirement(d) for d in deps if d.startswith("numba"))
    wheels = {("linux", "x86_64"): "3.10 3.11 3.12 3.13 3.14",
              ("linux", "aarch64"): "3.10 3.11 3.12 3.13 3.14",
              ("win32", "AMD64"): "3.10 3.11 3.12 3.13 3.14",
              ("win32", "ARM64"): "3.12 3.13 3.14",
              ("darwin", "arm64"): "3.10 3.11 3.12 3.13 3.14",
              ("darwin", "x86_64"): "3.10 3.11 3.12 3.13",
              ("linux", "ppc64le"): "", ("linux", "i686"): "", ("win32", "x86"): ""}
    for (system, machine), versions in wheels.items():
        for version in ("3.10", "3.11", "3.12", "3.13", "3.14", "3.15"):
            env = {"sys_platform": system, "platform_machine": machine, "python_version": version}
            assert numba.marker.evaluate(env) == (version in versions.split()), env


def test_the_status_says_why_the_pure_numpy_engine_runs(monkeypatch):
    monkeypatch.setenv("BNCUPY_CPU_ENGINE", "numpy")
    assert nb.engine_status() == ("numpy", "BNCUPY_CPU_ENGINE=numpy turns the compiled engine off")
    assert nb.engine().name == "numpy"
    monkeypatch.delenv("BNCUPY_CPU_ENGINE")
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba now fails: not installed
    monkeypatch.delitem(sys.modules, "bncupy.backends._compiled", raising=False)
    monkeypatch.delattr(bncupy.backends, "_compiled", raising=False)
    monkeypatch.setattr(nb, "_COMPILED", [])
    engine, why = nb.engine_status()
    assert engine == "numpy" and why.startswith("Numba is not installed")
    assert "pip install numba" in why


@needs_numba
def test_the_status_names_the_numba_version_and_the_cache():
    import numba

    engine, why = nb.engine_status()
    assert engine == "numba"
    assert f"Numba {numba.__version__}" in why
    cache = nb._compiled_engine().k.cache_dir()
    assert cache is not None and cache in why


def _child(code: str, env: dict[str, str], prefix: list[str] | None = None) -> dict:
    """``code`` in a fresh interpreter importing this bncupy; its last stdout line as JSON."""
    out = subprocess.run([*(prefix or []), sys.executable, "-c", code],
                         env={**env, "PYTHONPATH": str(PACKAGE.parent)}, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def _environ(**changes: str) -> dict[str, str]:
    """This environment without the variables that choose an engine or a cache, plus changes."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("BNCUPY_CPU_ENGINE", "NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    return {**env, **changes}


FIRST_CALL = """
import json, numpy as np, bncupy as bn
from bncupy.backends import _compiled as k
from bncupy.backends import numpy as nb
x = np.random.default_rng(0).standard_normal((4, 3, 100)).astype(np.float32)  # not small
bn.batch_norm(x, None, None, training=True)  # one call of the fused forward
bn.batch_norm_backward(x, x, None, np.zeros(3, np.float32), np.ones(3, np.float32))  # fused too
kernels = (k.fused_forward, k.fused_backward)
hits = sum(sum(f.stats.cache_hits.values()) for f in kernels)
misses = sum(sum(f.stats.cache_misses.values()) for f in kernels)
print(json.dumps({"engine": nb.engine_status(), "cache": k.cache_dir(), "hits": hits,
                  "misses": misses}))
"""


@needs_numba
@pytest.mark.slow
def test_compiled_code_is_cached_in_numba_cache_dir_and_loaded_from_there(tmp_path):
    env = _environ(NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    first = _child(FIRST_CALL, env)
    assert first["engine"][0] == "numba" and first["cache"].startswith(str(tmp_path))
    assert first["misses"] == 2 and first["hits"] == 0  # compiled, then written
    assert list((tmp_path / "cache").rglob("*.nbi"))
    second = _child(FIRST_CALL, env)
    assert second["hits"] == 2 and second["misses"] == 0  # loaded, not compiled


def _read_only_prefix(paths: list[Path]) -> list[str]:
    """A command prefix that runs its command with ``paths`` mounted read-only (a private mount
    namespace: needs ``unshare -m``, as root; chmod would not stop root)."""
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "-m", "true"], capture_output=True,
                           check=False) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("needs `unshare -m` (a private mount namespace) to mount paths read-only")
    mounts = " && ".join(f"mount --bind -o ro '{p}' '{p}'" for p in paths)
    return [unshare, "-m", "sh", "-c", f'{mounts} && exec "$0" "$@"']


@needs_numba
@pytest.mark.slow
def test_a_read_only_package_caches_in_the_user_cache_or_not_at_all(tmp_path):
    """Installed read-only (site-packages of a system Python, an image): Numba caches in the
    user's cache directory; with that read-only too, the loops are compiled in every process
    and work all the same."""
    home = tmp_path / "home"
    home.mkdir()
    env = _environ(HOME=str(home))
    user_cache = _child(FIRST_CALL, env, _read_only_prefix([PACKAGE]))
    assert user_cache["engine"][0] == "numba"
    assert user_cache["cache"].startswith(str(home / ".cache" / "numba"))
    assert list(home.rglob("*.nbi"))
    shutil.rmtree(home / ".cache")
    nowhere = _child(FIRST_CALL, env, _read_only_prefix([PACKAGE, home]))
    engine, why = nowhere["engine"]
    assert engine == "numba" and nowhere["cache"] is None
    assert "not cached" in why and "NUMBA_CACHE_DIR" in why
    assert nowhere["misses"] == 2


PERIOD_SHAPES = [(1, 1, 1), (7, 3, 1), (1000, 64, 1), (100352, 64, 1), (3, 40000, 1),
                 (2, 3, 70000), (33, 5, 7), (32, 512, 49), (8, 256, 100), (1, 9000, 20)]


@pytest.mark.parametrize("group", [1, 16])
@pytest.mark.parametrize("shape", PERIOD_SHAPES)
def test_period_tiles_cover_every_element_once_and_map_to_their_channels(shape, group):
    lay = _ufuncs.Periods(shape, group)
    channel = np.broadcast_to(np.arange(shape[1])[None, :, None], shape)
    seen = np.zeros(shape, np.int8)
    for tile in lay.tiles:
        lay.part(seen, tile)[...] += 1
        ch = lay.channels(tile)
        np.testing.assert_array_equal(lay.part(channel, tile),
                                      np.broadcast_to(lay.local(np.arange(shape[1])[ch], tile),
                                                      lay.part(channel, tile).shape))
    assert (seen == 1).all()


ENGINES = ["numpy", pytest.param("numba", marks=needs_numba)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_inf_and_nan_in_the_data_give_nan_in_their_channel_and_no_warning(monkeypatch, engine,
                                                                         dtype, axis, bad):
    monkeypatch.setenv("BNCUPY_CPU_ENGINE", engine)
    shape = (40, 3, 50) if axis == 1 else (40, 50, 3)
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    channel = (slice(None), 0) if axis == 1 else (..., 0)
    x[channel][3, 4] = bad
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, mean, invstd = bn.batch_norm_forward(x, rm, rv, None, None, training=True, axis=axis)
        dx = bn.batch_norm_backward(np.ones_like(y), x, None, mean, invstd, axis=axis)[0]
        bn.batch_norm(x, rm, rv, training=False, axis=axis, activation="relu")
        bn.welford(x, axis=axis).merge(bn.welford(x, axis=axis))
        bn.layer_norm(x, x.shape[-1:])
        bn.group_norm(x, 3, axis=axis)
        bn.BatchNorm1d(3, channels_last=axis == -1)(x)
    assert np.isnan(y[channel]).all() and np.isnan(dx[channel]).all()
    others = (slice(None), slice(1, None)) if axis == 1 else (..., slice(1, None))
    assert np.isfinite(y[others]).all() and np.isfinite(dx[others]).all()


def test_float16_tiles_widen_exactly_without_numpys_cast():
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)].reshape(-1, 8)  # shifted and scaled: subnormals too
    for tile in (finite, finite[:, 2:7], halves.reshape(256, 256)):  # the last holds inf, NaN
        np.testing.assert_array_equal(_ufuncs._widened(tile, np.dtype(np.float32)).view(np.uint32),
                                      tile.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("engine, shape, far", [
    # pure-NumPy rows: every 16th value; periods: each tile's first row of 32 planes
    ("numpy", (8, 256, 784), (slice(None), slice(None), slice(0, None, 16))),
    ("numpy", (1024, 256, 1), (np.r_[0:32, 512:544],)),
    # compiled column blocks (1024 rows of 64 channels): the first 16 rows of each
    pytest.param("numba", (4096, 64, 1), (np.r_[0:16, 1024:1040, 3072:3088],), marks=needs_numba),
])
def test_a_unit_whose_sampled_centre_is_far_from_its_mean_is_summed_again(engine, shape, far):
    # the engines centre a tile or block on a sample; moved 3000 standard deviations away,
    # summing about it alone loses 10-25x the precision (measured 0.8e-6 to 2.2e-6)
    x3 = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x3[far] += 3000
    passes = _ufuncs.NumpyPasses if engine == "numpy" else nb._compiled_engine()
    mean, m2 = passes.moments(x3)
    x64 = x3.astype(np.float64)
    ref_mean = x64.mean(axis=(0, 2))
    ref_m2 = ((x64 - ref_mean[:, None]) ** 2).sum(axis=(0, 2))
    np.testing.assert_allclose(m2, ref_m2, rtol=3e-7)
    np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=1e-7 * np.sqrt(ref_m2).max())


def test_the_pure_numpy_engine_leaves_numpys_ufunc_buffer_size_as_it_found_it(monkeypatch):
    monkeypatch.setenv("BNCUPY_CPU_ENGINE", "numpy")
    x = np.random.default_rng(0).standard_normal((4, 8, 600)).astype(np.float32)
    old = np.setbufsize(4096)
    try:
        y, mean, invstd = bn.batch_norm_forward(x, None, None, None, None, training=True)
        bn.batch_norm_backward(np.ones_like(y), x, None, mean, invstd)
        assert np.getbufsize() == 4096
    finally:
        np.setbufsize(old)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("rows", [3, 300, 3000])  # small path, one-call and engine passes
def test_float16_running_statistics_overflow_to_inf_without_a_warning(monkeypatch, engine, rows):
    monkeypatch.setenv("BNCUPY_CPU_ENGINE", engine)
    x = np.resize(np.array([[3000, -3000], [-3000, 3000], [1, 2]], np.float32), (rows, 2))
    rm, rv = np.zeros(2, np.float16), np.ones(2, np.float16)
    layer = bn.BatchNorm1d(2, dtype=np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn.batch_norm(x, rm, rv, None, None, True)
        layer(x)
    assert np.isinf(rv).all() and np.isinf(layer.running_var).all()  # var 9e6 > float16's max
    np.testing.assert_allclose(rm, 0.1 * x.mean(axis=0, dtype=np.float64), rtol=1e-3)


def test_gradients_beyond_a_float16_parameter_become_inf_without_a_warning():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 3, 4)) * 3e3).astype(np.float32)
    dy = np.full_like(x, 3e3)  # sum(dy) per channel 7.7e5: over float16's 65504
    w = np.ones(3, np.float16)
    rows, w_rows = x.reshape(64, 12), np.ones(12, np.float16)
    layers = [bn.BatchNorm1d(3, dtype=np.float16), bn.GroupNorm(3, 3, dtype=np.float16),
              bn.LayerNorm(12, dtype=np.float16)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = [bn.batch_norm_backward(dy, x, w, *bn.batch_norm_forward(
                     x, None, None, w, None, training=True)[1:])[2],
                 bn.group_norm_backward(dy, x, 3, *bn.group_norm_forward(x, 3, w)[1:], w)[2],
                 bn.layer_norm_backward(dy.reshape(64, 12), rows, 12,
                                        *bn.layer_norm_forward(rows, 12, w_rows)[1:], w_rows)[2]]
        for layer in layers:
            data = rows if isinstance(layer, bn.LayerNorm) else x
            layer(data)
            layer.backward(dy.reshape(data.shape))
            grads.append(layer.grad_bias)
    for g in grads:
        assert g.dtype == np.float16 and np.isposinf(g).all()

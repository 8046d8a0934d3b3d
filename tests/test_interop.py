"""Arrays of other libraries through DLPack, and memory layouts kept.

A small DLPack library of the tests' own (tests/foreign.py) runs everywhere; JAX CPU arrays run
where JAX is installed (tox env ``jax``); torch tensors are in tests/test_torch_interop.py.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import bncupy as bn
from bncupy.backends import cupy as cupy_backend
from bncupy.backends import numpy as numpy_backend
from tests import oracle
from tests.conftest import GPU_REASON, needs
from tests.foreign import HostArray


def _data(shape=(4, 3, 5, 6), seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 2 + 1).astype(dtype)


# NumPy before 2.1 imports DLPack memory read-only (and cannot export read-only arrays), so
# running statistics cannot be updated in place through DLPack there; bncupy then refuses them.
OLD_DLPACK = pytest.mark.skipif(
    np.lib.NumpyVersion(np.__version__) < "2.1.0",
    reason=f"NumPy {np.__version__} imports DLPack memory read-only; in-place updates through "
           f"DLPack need NumPy >= 2.1")


# ------------------------------------------------------------------------------ DLPack in and out
@OLD_DLPACK
def test_foreign_arrays_in_give_their_kind_out_and_running_stats_update_in_place():
    x, dy = _data(), _data(seed=1)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    w, b = np.full(3, 1.5, np.float32), np.full(3, -0.5, np.float32)
    frm, frv = HostArray(rm.copy()), HostArray(rv.copy())
    y, m, s = bn.batch_norm_forward(HostArray(x), frm, frv, HostArray(w), HostArray(b),
                                    training=True)
    ref_y, ref_m, ref_s = bn.batch_norm_forward(x, rm, rv, w, b, training=True)
    assert all(isinstance(a, HostArray) for a in (y, m, s))
    np.testing.assert_array_equal(y.data, ref_y)
    np.testing.assert_array_equal(m.data, ref_m)
    np.testing.assert_array_equal(frm.data, rm)  # updated in place, as the NumPy arrays were
    np.testing.assert_array_equal(frv.data, rv)
    assert not (rm == 0).all()
    grads = bn.batch_norm_backward(HostArray(dy), HostArray(x), HostArray(w), m, s)
    for got, ref in zip(grads, bn.batch_norm_backward(dy, x, w, ref_m, ref_s), strict=True):
        assert isinstance(got, HostArray)
        np.testing.assert_array_equal(got.data, ref)
    out = bn.batch_norm(HostArray(x), None, None, training=True)
    np.testing.assert_array_equal(out.data, bn.batch_norm(x, None, None, training=True))


def test_accepts_passes_arguments_on_as_given_and_imports_foreign_ones_however_passed():
    from bncupy._interop import accepts

    seen = []

    def fn(a, /, x, scale=2.0, *, residual=None, axis=1):
        seen.append((type(x), type(residual), scale, axis))
        return x if residual is None else residual

    wrapped = accepts("x", "residual")(fn)
    assert inspect.signature(wrapped) == inspect.signature(fn)
    assert wrapped.__name__ == "fn" and wrapped.__wrapped__ is fn
    x = _data((2, 3))
    assert wrapped(None, x) is x  # NumPy arrays: straight through
    assert seen.pop() == (np.ndarray, type(None), 2.0, 1)
    for call in (lambda f: wrapped(None, f, 3.0, axis=-1), lambda f: wrapped(None, x=f),
                 lambda f: wrapped(None, HostArray(x), residual=f)):
        out = call(HostArray(x))  # positionally, by keyword, keyword-only: imported
        assert isinstance(out, HostArray)
        np.testing.assert_array_equal(out.data, x)
        assert seen.pop()[:2] in ((np.ndarray, type(None)), (np.ndarray, np.ndarray))
    with pytest.raises(TypeError, match="positional"):
        wrapped(a=None, x=x)  # positional-only stays positional-only
    with pytest.raises(TypeError, match="unexpected keyword"):
        wrapped(None, x, shift=1.0)
    assert accepts("x")(lambda *args: args)(1, 2) == (1, 2)  # *args: the general wrapper


@OLD_DLPACK
def test_foreign_statistics_and_merge():
    x = _data()
    mean, var = bn.moments(HostArray(x))
    ref_mean, ref_var = bn.moments(x)
    assert isinstance(mean, HostArray) and isinstance(var, HostArray)
    np.testing.assert_array_equal(mean.data, ref_mean)
    np.testing.assert_array_equal(var.data, ref_var)
    merged = bn.welford(HostArray(x[:2])).merge(bn.welford(HostArray(x[2:])))
    assert isinstance(merged.mean, HostArray) and merged.count == x.size // 3
    np.testing.assert_allclose(merged.mean.data, ref_mean, rtol=1e-6)
    with pytest.raises(TypeError, match="other.mean is a numpy.ndarray"):
        bn.welford(HostArray(x)).merge(bn.welford(x))


def test_layer_takes_foreign_arrays_and_keeps_numpy_state():
    x, dy = _data(), _data(seed=2)
    with bn.use_backend("numpy"):
        ours, ref = bn.BatchNorm2d(3), bn.BatchNorm2d(3)
    y = ours(HostArray(x))
    assert isinstance(y, HostArray)
    np.testing.assert_array_equal(y.data, ref(x))
    dx = ours.backward(HostArray(dy))
    assert isinstance(dx, HostArray)
    np.testing.assert_array_equal(dx.data, ref.backward(dy))
    assert isinstance(ours.running_mean, np.ndarray) and isinstance(ours.grad_weight, np.ndarray)
    np.testing.assert_array_equal(ours.running_var, ref.running_var)
    w2, b2 = bn.fold_into(HostArray(np.ones((3, 2), np.float32)), None, ours.eval())
    assert isinstance(w2, HostArray) and isinstance(b2, HostArray)


def test_mixed_kinds_name_the_arguments():
    x = _data()
    with pytest.raises(TypeError) as info:
        bn.batch_norm(HostArray(x), np.zeros(3, np.float32), np.ones(3, np.float32),
                      training=True)
    message = str(info.value)
    assert "input is a tests.HostArray (cpu)" in message
    assert "running_mean is a numpy.ndarray" in message
    with pytest.raises(TypeError, match="grad_output is a numpy.ndarray"):
        bn.batch_norm_backward(x, HostArray(x), None, np.zeros(3), np.ones(3))


def test_read_only_input_is_used_and_read_only_running_stats_are_refused():
    x = _data()
    frozen = x.copy()
    frozen.flags.writeable = False
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    if np.lib.NumpyVersion(np.__version__) >= "2.1.0":  # DLPack 1.0 carries the read-only flag
        y = bn.batch_norm(HostArray(frozen), None, None, training=True)
        np.testing.assert_array_equal(y.data, bn.batch_norm(x, None, None, training=True))
        np.testing.assert_array_equal(frozen, x)
    frozen_stats = rm.copy()
    frozen_stats.flags.writeable = False
    with pytest.raises((TypeError, ValueError), match="running_mean"):
        bn.batch_norm(HostArray(x), HostArray(frozen_stats), HostArray(rv.copy()), training=True)
    np.testing.assert_array_equal(frozen_stats, rm)


def test_read_only_running_stats_serve_eval():
    # JAX exports running statistics read-only; eval only reads them (every NumPy engine)
    x = _data()
    rm, rv = np.full(3, 0.25, np.float32), np.full(3, 2.0, np.float32)
    expected = bn.batch_norm(x, rm, rv, training=False)
    for a in (rm, rv):
        a.flags.writeable = False
    np.testing.assert_array_equal(bn.batch_norm(x, rm, rv, training=False), expected)


def test_unsupported_device_and_refused_export_name_the_argument():
    x = _data()
    with pytest.raises(TypeError, match="weight .*DLPack device type 4"):
        bn.batch_norm(HostArray(x), None, None, HostArray(np.ones(3, np.float32), 4),
                      training=True)

    class Refuses(HostArray):
        def __dlpack__(self, **kwargs):
            raise BufferError("cannot export this one")

    with pytest.raises(TypeError, match="input .*could not be imported through DLPack"):
        bn.batch_norm(Refuses(x), None, None, training=True)


@pytest.mark.skipif(GPU_REASON is None, reason="the CuPy backend can run here")
def test_cuda_memory_without_a_gpu_says_what_is_missing():
    with pytest.raises(bn.BackendUnavailableError, match="cupy backend cannot run"):
        bn.batch_norm(HostArray(_data(), device_type=2), None, None, training=True)


@OLD_DLPACK
def test_explicit_backend_computes_there_and_returns_the_callers_kind(backend):
    x = _data()
    rm = np.zeros(3, np.float32)
    frm, frv = HostArray(rm.copy()), HostArray(np.ones(3, np.float32))
    with bn.use_backend(backend.name):
        y = bn.batch_norm(HostArray(x), frm, frv, training=True)
    ref, _, _, ref_rm, _ = oracle.forward(x, running_mean=rm, running_var=np.ones(3))
    assert isinstance(y, HostArray)
    np.testing.assert_allclose(y.data, ref, atol=2e-5)
    np.testing.assert_allclose(frm.data, ref_rm, rtol=1e-5, atol=1e-7)


def test_bncupy_never_imports_other_array_libraries():
    code = ("import sys, numpy as np, bncupy as bn\n"
            "x = np.ones((4, 3), np.float32)\n"
            "bn.BatchNorm1d(3)(x); bn.batch_norm(x, None, None, training=True)\n"
            "print(sorted(m for m in ('torch', 'jax', 'jaxlib', 'bncupy.torch') "
            "if m in sys.modules))\n")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root, env={**os.environ, "BNCUPY_BACKEND": "numpy"})
    assert out.stdout.strip() == "[]"


def test_jax_cpu_arrays():
    jax = needs("jax", "jax", "JAX is not installed (tox env 'jax' runs this test)")
    jnp = jax.numpy
    x, dy = _data(), _data(seed=3)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, m, s = bn.batch_norm_forward(jnp.asarray(x), None, None, training=True)
    assert isinstance(y, jax.Array) and isinstance(s, jax.Array)
    ref_y, ref_m, ref_s = bn.batch_norm_forward(x, None, None, training=True)
    np.testing.assert_array_equal(np.asarray(y), ref_y)
    dx, dw, db = bn.batch_norm_backward(jnp.asarray(dy), jnp.asarray(x), None, m, s)
    assert isinstance(dx, jax.Array)
    np.testing.assert_array_equal(np.asarray(dx), bn.batch_norm_backward(dy, x, None, ref_m,
                                                                         ref_s)[0])
    # JAX arrays are immutable: exported read-only, never written, refused as running stats
    with pytest.raises(ValueError, match="running_mean is updated in place and must be "
                                         "writeable"):
        bn.batch_norm(jnp.asarray(x), jnp.asarray(rm), jnp.asarray(rv), training=True)
    np.testing.assert_array_equal(np.asarray(bn.batch_norm(jnp.asarray(x), jnp.asarray(rm),
                                                           jnp.asarray(rv), training=False)),
                                  bn.batch_norm(x, rm, rv, training=False))


# ------------------------------------------------------------------------------ memory layout
def _channels_last(backend, a):
    """``a`` (N, C, ...) in channels-last memory: logical shape kept, NHWC strides."""
    moved = np.ascontiguousarray(np.moveaxis(a, 1, -1))
    return backend.xp.asarray(moved).transpose(0, a.ndim - 1, *range(1, a.ndim - 1))


def _channels_first(backend, a):
    """``a`` (N, ..., C) in channels-first memory."""
    moved = np.ascontiguousarray(np.moveaxis(a, -1, 1))
    return backend.xp.asarray(moved).transpose(0, *range(2, a.ndim), 1)


def _spy_backend_inputs(monkeypatch, backend):
    """Record the arrays the backend's launch plan (CuPy) or normalize_train (NumPy) sees."""
    seen = []
    if backend.name == "cupy":
        plan = cupy_backend._geometry

        def geometry(x, axis, *others):
            geo = plan(x, axis, *others)
            seen.append((x, geo.cl))
            return geo

        monkeypatch.setattr(cupy_backend, "_geometry", geometry)
    else:
        train = numpy_backend.normalize_train

        def normalize_train(x, axis, *args, **kwargs):
            seen.append((x, axis == x.ndim - 1))
            return train(x, axis, *args, **kwargs)

        monkeypatch.setattr(numpy_backend, "normalize_train", normalize_train)
    return seen


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (6, 3, 7), (2, 3, 2, 3, 4)])
def test_channels_last_memory_is_kept_and_computed_without_a_copy(backend, monkeypatch, shape):
    x, dy, z = _data(shape), _data(shape, seed=1), _data(shape, seed=2)
    cx, cdy, cz = (_channels_last(backend, a) for a in (x, dy, z))
    seen = _spy_backend_inputs(monkeypatch, backend)
    y, m, s = bn.batch_norm_forward(cx, None, None, training=True)
    x_seen, channels_last = seen[0]
    assert channels_last and x_seen.flags.c_contiguous
    assert x_seen.data.ptr == cx.data.ptr if backend.name == "cupy" else \
        np.shares_memory(x_seen, cx)
    assert y.strides == cx.strides
    np.testing.assert_allclose(backend.to_numpy(y), oracle.forward(x)[0], atol=2e-5)
    dx, dw, db = bn.batch_norm_backward(cdy, cx, None, m, s)
    assert dx.strides == cx.strides
    ref_dx, ref_dw, ref_db = oracle.backward(dy, x)
    np.testing.assert_allclose(backend.to_numpy(dx), ref_dx, atol=1e-4)
    np.testing.assert_allclose(backend.to_numpy(dw), ref_dw, rtol=1e-4, atol=1e-4)
    # a layer with a fused ReLU and residual, train and eval
    layer = bn.BatchNorm1d(3) if len(shape) == 3 else \
        (bn.BatchNorm2d(3) if len(shape) == 4 else bn.BatchNorm3d(3))
    layer.activation = "relu"
    out = layer(cx, residual=cz)
    assert out.strides == cx.strides
    np.testing.assert_allclose(backend.to_numpy(out), np.maximum(oracle.forward(x)[0] + z, 0),
                               atol=3e-5)
    assert layer.backward(cdy).strides == cx.strides
    assert layer.eval()(cx).strides == cx.strides
    mean, var = bn.moments(cx)
    np.testing.assert_allclose(backend.to_numpy(mean), x.mean(axis=(0, *range(2, x.ndim))),
                               rtol=1e-5, atol=1e-6)


def test_channels_first_memory_with_axis_minus_one_is_kept(backend):
    x = _data((4, 5, 6, 3))
    cx = _channels_first(backend, x)
    y = bn.batch_norm(cx, None, None, training=True, axis=-1)
    assert y.strides == cx.strides
    np.testing.assert_allclose(backend.to_numpy(y), oracle.forward(x, axis=-1)[0], atol=2e-5)


def test_other_layouts_compute_as_before(backend):
    x = _data()
    strided = backend.asarray(x[..., ::2])  # not dense: computed on a contiguous copy
    y = bn.batch_norm(strided, None, None, training=True)
    assert y.flags.c_contiguous
    np.testing.assert_allclose(backend.to_numpy(y), oracle.forward(x[..., ::2])[0], atol=2e-5)
    swapped = backend.xp.asarray(np.ascontiguousarray(x.swapaxes(2, 3))).swapaxes(2, 3)
    y = bn.batch_norm(swapped, None, None, training=True)  # spatial axes swapped: not a layout
    assert y.flags.c_contiguous                          # bncupy has kernels for (as torch)
    np.testing.assert_allclose(backend.to_numpy(y), oracle.forward(x)[0], atol=2e-5)


class _Bfloat16Cuda:
    """A CUDA bfloat16 array of another library, as a torch bfloat16 CUDA tensor looks."""

    dtype = "torch.bfloat16"
    shape, ndim = (4, 3), 2

    def __dlpack__(self, **kwargs):
        raise AssertionError("imported through the fake CuPy")

    def __dlpack_device__(self):
        return (2, 0)


def test_a_bfloat16_cuda_array_on_cupy_13_is_a_type_error_naming_the_version(monkeypatch):
    """CuPy 13 has no bfloat16 arrays: its DLPack import refuses, and the error says so."""
    from bncupy import _interop

    def refuse(value):
        raise TypeError("Unsupported dtype")

    fake = types.SimpleNamespace(__version__="13.6.0", from_dlpack=refuse, asarray=refuse)
    monkeypatch.setattr(_interop.cupy_backend, "require", lambda: fake)
    with pytest.raises(TypeError, match=r"input .*bfloat16.*CuPy >= 14 \(CuPy 13\.6\.0"):
        _interop.to_native(_Bfloat16Cuda(), "input")


def test_a_bfloat16_host_array_without_int16_view_comes_in_through_its_array(monkeypatch):
    """A foreign bfloat16 host array whose DLPack NumPy refuses and whose library has no int16
    (JAX's arrays hand out ml_dtypes arrays through __array__): imported by __array__."""
    from bncupy import _interop
    from bncupy._dtypes import BFLOAT16

    data = np.arange(6, dtype=np.float32).reshape(2, 3).astype(BFLOAT16)

    class Foreign:
        dtype = "bfloat16"

        def __dlpack__(self, **kwargs):
            raise BufferError("unsupported dtype")

        def __dlpack_device__(self):
            return (1, 0)

        def __array__(self, dtype=None, copy=None):
            return data

    native = _interop.to_native(Foreign(), "input")
    assert native.dtype == BFLOAT16 and np.array_equal(native.astype(np.float32),
                                                       data.astype(np.float32))

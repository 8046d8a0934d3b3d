"""The host-cost fast paths agree with the general ones: the NumPy backend's small-tensor path
(compiled one-call kernels and whole-array NumPy operations) against the engines and the float64
oracle, the per-signature launch plans against misaligned arrays of the same signature, and the
overlap pre-check against the exact test."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest

import bncupy as bn
from bncupy import _functional
from bncupy import _validation as v
from bncupy.backends import numpy as nb
from tests import oracle
from tests.conftest import EMULATED

NUMBA = pytest.param("numba", marks=pytest.mark.skipif(
    nb._load_compiled() is None, reason="numba is not installed (the default tox envs have it)"))


def _fresh_signatures():
    """Forget every checked signature (so the next calls plan again)."""
    for checked in (_functional._FORWARD_CHECKED, _functional._BACKWARD_CHECKED):
        checked.table.clear()


@pytest.fixture(params=["numpy", NUMBA])
def small_engine(request, monkeypatch):
    """The small path with the compiled kernels (numba) or NumPy operations (numpy)."""
    monkeypatch.setenv("BNCUPY_CPU_ENGINE", request.param)
    _fresh_signatures()
    yield request.param
    _fresh_signatures()


def _run(x, rm, rv, w, b, z, dy, axis, relu, training):
    r1 = None if rm is None else rm.copy()
    r2 = None if rv is None else rv.copy()
    y, m, s = bn.batch_norm_forward(x, r1, r2, w, b, training, axis=axis,
                                    activation="relu" if relu else None, residual=z)
    grads = bn.batch_norm_backward(dy, x, w, m, s, axis=axis, training=training)
    layer = bn.BatchNorm2d(x.shape[axis], channels_last=axis == -1,
                           activation="relu" if relu else None)
    if training is False:
        layer.eval()
    out = layer(x, residual=z)
    layer_grads = (layer.backward(dy), layer.grad_weight, layer.grad_bias)
    return (y, m, s, r1, r2, *grads, out, *layer_grads)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("vector_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("relu, residual", [(False, False), (True, True)])
@pytest.mark.parametrize("training", [True, False])
def test_small_path_agrees_with_the_engines_and_the_oracle(small_engine, monkeypatch, dtype,
                                                           vector_dtype, axis, relu, residual,
                                                           training):
    rng = np.random.default_rng(3)
    shape = (4, 3, 5, 5) if axis == 1 else (4, 5, 5, 3)
    assert np.prod(shape) < nb.SMALL_ELEMENTS
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    z = rng.standard_normal(shape).astype(dtype) if residual else None
    rm = rng.standard_normal(3).astype(vector_dtype)
    rv = rng.uniform(0.5, 2.0, 3).astype(vector_dtype)
    w = rng.uniform(0.5, 2.0, 3).astype(vector_dtype)
    b = rng.standard_normal(3).astype(vector_dtype)
    small = _run(x, rm, rv, w, b, z, dy, axis, relu, training)
    monkeypatch.setattr(nb, "SMALL_ELEMENTS", 0)  # the engines' path for the same calls
    _fresh_signatures()
    general = _run(x, rm, rv, w, b, z, dy, axis, relu, training)
    names = ("y", "save_mean", "save_invstd", "running_mean", "running_var", "dx", "dweight",
             "dbias", "layer y", "layer dx", "layer dweight", "layer dbias")
    tol = 2e-2 if dtype == np.float16 else 1e-5 if dtype == np.float32 else 1e-12
    for name, a, c in zip(names, small, general, strict=True):
        assert a.dtype == c.dtype and a.shape == c.shape and a.strides == c.strides, name
        np.testing.assert_allclose(a.astype(np.float64), c.astype(np.float64), rtol=tol,
                                   atol=tol, err_msg=name)
    if not training:  # the same statistics: the same elementwise operations, bitwise
        np.testing.assert_array_equal(small[0], general[0])
    ref = oracle.forward(x, axis, w, b, training=training, running_mean=rm, running_var=rv)
    expected = ref[0] + (0 if z is None else z.astype(np.float64))
    if relu:
        expected = np.maximum(expected, 0)
    np.testing.assert_allclose(small[0].astype(np.float64), expected,
                               atol=5e-2 if dtype == np.float16 else 1e-4)
    if training:
        np.testing.assert_allclose(small[3], ref[3], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(small[4], ref[4], rtol=1e-5, atol=1e-5)
    if not relu:
        ref_dx, ref_dw, ref_db = oracle.backward(dy, x, axis, w, training=training,
                                                 running_mean=rm, running_var=rv)
        np.testing.assert_allclose(small[5].astype(np.float64), ref_dx,
                                   atol=5e-2 if dtype == np.float16 else 1e-4)
        np.testing.assert_allclose(small[6], ref_dw, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(small[7], ref_db, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("value", [0.1, 1 / 3, -37.25, 1e6])
def test_small_path_maps_constant_channels_to_exactly_beta(small_engine, value):
    x = np.full((4, 3, 5, 5), value, np.float32)
    g, b = np.array([1.5, 2.0, -1.0], np.float32), np.array([0.5, -2.0, 3.25], np.float32)
    y = bn.batch_norm(x, None, None, g, b, training=True)
    np.testing.assert_array_equal(y, np.broadcast_to(b.reshape(1, 3, 1, 1), x.shape))


def test_small_path_keeps_inf_and_nan_in_their_channel_without_warnings(small_engine):
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    x[0, 1, 0, 0] = np.inf
    x[1, 2, 0, 0] = np.nan
    with np.errstate(all="raise"):
        y = bn.batch_norm(x, None, None, training=True)
        dx, dw, db = bn.batch_norm_backward(x, x, None, *bn.batch_norm_forward(
            x, None, None, training=True)[1:])
    assert np.isfinite(y[:, 0]).all() and np.isnan(y[:, 1:]).all()
    assert np.isfinite(dx[:, 0]).all()


def test_small_plans_only_for_small_contiguous_float_signatures():
    x = np.ones((4, 3, 5, 5), np.float32)
    vec = np.ones(3, np.float32)
    assert nb.plan(x, 1, (None,), (vec, None)).compiled
    assert nb.plan(x, 1, (None,), (vec, None)).convert == (False, False)
    assert not nb.plan(x.astype(np.float16), 1, (None,), (vec,)).compiled
    strided = nb.plan(x, 1, (None,), (np.ones(6, np.float32)[::2], vec.astype(np.float16)))
    assert strided.compiled and strided.convert == (True, True)  # taken as float64 copies
    assert nb.plan(x[:, :, ::2], 1) is None  # not contiguous: the engines copy it
    assert nb.plan(np.ones((64, 32), np.float32), 1) is None  # not small
    assert nb.plan(np.ones((0, 3), np.float32), 1) is None


def test_apart_decides_by_owner_and_falls_back_to_the_exact_test():
    base = np.zeros(8)
    rm, rv, x = np.zeros(3), np.ones(3), np.ones((4, 3))
    assert v.apart((rm, rv, x, None), 2)
    assert not v.apart((base[:3], base[3:6], x), 2)  # one owner: maybe overlapping
    v.check_no_overlap({"running_mean": base[:3], "running_var": base[3:6]}, {"input": x})
    assert not v.apart((rm, rv, rm.reshape(1, 3)), 2)
    with pytest.raises(ValueError, match="running_mean and input"):
        v.check_no_overlap({"running_mean": rm, "running_var": rv}, {"input": rm[None]})
    foreign = np.frombuffer(bytearray(24))  # memory NumPy does not own: never decided here
    assert not v.apart((foreign, rv, x), 2)


def test_apart_on_device_arrays_compares_byte_ranges_of_the_written_arrays_only():
    def device(ptr, shape, strides, itemsize=4):
        return types.SimpleNamespace(data=types.SimpleNamespace(ptr=ptr), shape=shape,
                                     strides=strides, itemsize=itemsize,
                                     size=math.prod(shape))

    rm, rv = device(1024, (3,), (4,)), device(2048, (3,), (4,))
    x = device(4096, (2, 3), (12, 4))
    empty = device(1024, (0,), (4,))
    arrays = (rm, rv, x, None, empty)
    spans = v.byte_spans(arrays)
    assert spans == ((0, 0, 12), (1, 0, 12), (2, 0, 24))  # None and empty arrays left out
    assert v.apart(arrays, 2, spans)
    assert not v.apart(arrays, 2)  # no spans: undecided
    for ptr, meets in ((1012, False), (1016, True), (1036, False), (4084, False), (4100, True)):
        moved = (rm, device(ptr, (3,), (4,)), x)  # running_var's bytes [ptr, ptr + 12)
        assert v.apart(moved, 2, v.byte_spans(moved)) is not meets, ptr
    backwards = device(1036, (3,), (-4,))  # bytes [1028, 1040): meets running_mean's end
    assert not v.apart((rm, rv, backwards), 2, v.byte_spans((rm, rv, backwards)))
    read = (rm, rv, x, device(4096, (2, 3), (12, 4)))  # two read arrays may share memory
    assert v.apart(read, 2, v.byte_spans(read))


def test_overlapping_running_statistics_are_refused_on_every_call(backend):
    xp = backend.xp
    x = backend.asarray(np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32))
    stats = xp.zeros(6, np.float32)
    rm, rv = stats[:3], stats[3:]
    for _ in range(2):  # the second call is a cached signature
        bn.batch_norm(x, rm, rv, training=True)
    shared = xp.zeros(3, np.float32)
    for _ in range(2):
        with pytest.raises(ValueError, match="running_mean and running_var overlap"):
            bn.batch_norm(x, shared, shared, training=True)


def test_a_cached_signature_with_another_alignment_is_planned_again(backend):
    """Same shape, strides and dtype, data 4 bytes off the 16-byte boundary: the launch plan's
    geometry (vector loads) follows the alignment, not the cached signature."""
    rng = np.random.default_rng(5)
    host = rng.standard_normal(4 * 8 * 6 + 1).astype(np.float32)
    buf = backend.asarray(host)
    aligned = buf[:-1].reshape(4, 8, 6)
    shifted = buf[1:].reshape(4, 8, 6)
    for x, ref in ((aligned, host[:-1]), (shifted, host[1:]), (aligned, host[:-1])):
        y, m, s = bn.batch_norm_forward(x, None, None, training=True)
        expected = oracle.forward(ref.reshape(4, 8, 6))[0]
        np.testing.assert_allclose(backend.to_numpy(y), expected, atol=1e-4)
        dx = bn.batch_norm_backward(x, x, None, m, s)[0]
        np.testing.assert_allclose(backend.to_numpy(dx),
                                   oracle.backward(ref.reshape(4, 8, 6), ref.reshape(4, 8, 6))[0],
                                   atol=1e-3)


def test_layer_follows_changed_state_on_a_cached_signature(backend):
    """A layer's input checks are cached by signature; its state and options are read anew."""
    x = backend.asarray(np.random.default_rng(1).standard_normal((4, 3, 5, 5)).astype(np.float32))
    layer = bn.BatchNorm2d(3)
    layer(x)
    layer.num_features = 4  # a call checks the input against the layer as it is now
    with pytest.raises(ValueError, match="num_features=4"):
        layer(x)
    layer.num_features = 3
    layer.eval()
    y = layer(x)
    rm, rv = (backend.to_numpy(a) for a in (layer.running_mean, layer.running_var))
    ref = oracle.forward(backend.to_numpy(x), 1, training=False, running_mean=rm,
                         running_var=rv)[0]
    np.testing.assert_allclose(backend.to_numpy(y), ref, atol=1e-5)


def test_layer_backward_is_checked_by_its_forward_signature_and_grad_output(backend):
    """A layer's backward is cached under its forward's entry, grad_output's signature and the
    parameters' as they are now: each change is checked again."""
    rng = np.random.default_rng(2)
    layer = bn.BatchNorm2d(3)
    for dtype in (np.float32, np.float64, np.float32):  # each forward signature, then again
        host = rng.standard_normal((4, 3, 5, 5)).astype(dtype)
        dy = rng.standard_normal((4, 3, 5, 5)).astype(dtype)
        x = backend.asarray(host)
        for _ in range(2):
            layer(x)
            dx = layer.backward(backend.asarray(dy))
            assert dx.dtype == dtype
            np.testing.assert_allclose(backend.to_numpy(dx), oracle.backward(dy, host)[0],
                                       atol=1e-3 if dtype == np.float32 else 1e-9)
            with pytest.raises(ValueError, match="grad_output"):
                layer.backward(backend.asarray(dy[:2]))
    layer(x)
    layer.weight = backend.asarray(np.ones(4, np.float32))  # replaced between the two passes
    with pytest.raises(ValueError, match="weight"):
        layer.backward(backend.asarray(dy))
    layer.weight = backend.asarray(np.ones(3, np.float64))
    layer.backward(backend.asarray(dy))
    assert layer.grad_weight.dtype == np.float64


@pytest.mark.parametrize("rms", [False, True])
def test_row_norm_layers_vouched_and_general_paths_agree_bitwise(backend, rms):
    """A LayerNorm/RMSNorm layer whose call signature vouches for its arrays (its backend's
    own, contiguous, one dtype) hands them over as they are; views, another dtype of
    grad_output and strided residuals take the general path. Both give the same bits."""
    rng = np.random.default_rng(4)
    host = rng.standard_normal((6, 16, 4)).astype(np.float32)
    dy = rng.standard_normal((6, 16, 4)).astype(np.float32)
    z = rng.standard_normal((6, 16, 4)).astype(np.float32)

    def step(x, residual, grad):
        layer = (bn.RMSNorm if rms else bn.LayerNorm)(4)
        layer(x)  # the layer's state follows the input's kind
        layer.weight[...] = backend.asarray(np.linspace(0.5, 1.5, 4, dtype=np.float32))
        y, h = layer(x, residual=residual, prenorm=True)
        dx = layer.backward(grad)
        return [backend.to_numpy(a) for a in (y, h, dx, layer.grad_weight)]

    as_is = step(backend.asarray(host), backend.asarray(z), backend.asarray(dy))
    for _ in range(2):  # the second time from the cached signatures
        assert [a.tobytes() for a in step(backend.asarray(host), backend.asarray(z),
                                          backend.asarray(dy))] == [a.tobytes() for a in as_is]
    views = step(backend.asarray(host.transpose(1, 0, 2).copy()).transpose(1, 0, 2),
                 backend.asarray(np.asfortranarray(z)), backend.asarray(dy))
    for got, want in zip(views, as_is, strict=True):
        np.testing.assert_array_equal(got, want)
    wide = step(backend.asarray(host), backend.asarray(z),
                backend.asarray(dy.astype(np.float64)))  # cast to the input's dtype first
    for got, want in zip(wide, as_is, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("make", [
    pytest.param(lambda last: bn.GroupNorm(4, 8, channels_last=last), id="GroupNorm"),
    pytest.param(lambda last: bn.InstanceNorm2d(8, affine=True, track_running_stats=True,
                                                channels_last=last), id="InstanceNorm2d"),
    pytest.param(lambda last: bn.InstanceNorm2d(8, channels_last=last), id="InstanceNorm2d-bare"),
])
@pytest.mark.parametrize("last", [False, True])
def test_group_layers_cached_and_general_paths_agree_bitwise(backend, make, last):
    """GroupNorm/InstanceNorm layers look their call's checked entry up first: a hit runs only
    the layer's width check and hands contiguous arrays over as they are; a view takes the
    general path. Both give the same bits; a changed width is refused on a cached
    signature; eval mode (running statistics) gives the same as before too."""
    rng = np.random.default_rng(6)
    shape = (3, 5, 4, 8) if last else (3, 8, 5, 4)
    host, dy = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))

    def step(layer, x):
        y = layer(x)
        dx = layer.backward(backend.asarray(dy))
        return [backend.to_numpy(a) for a in (y, dx, layer.grad_weight)
                if a is not None]

    layers = [make(last) for _ in range(3)]
    first = step(layers[0], backend.asarray(host))
    again = step(layers[1], backend.asarray(host))  # the cached entry's path
    view = step(layers[2], backend.asarray(np.asfortranarray(host)))
    for a, b, c in zip(first, again, view, strict=True):
        assert a.tobytes() == b.tobytes()
        np.testing.assert_array_equal(a, c)
    layer = layers[1]
    width = "num_channels" if isinstance(layer, bn.GroupNorm) else "num_features"
    setattr(layer, width, 16)
    with pytest.raises(ValueError, match=f"{width}=16"):
        layer(backend.asarray(host))
    setattr(layer, width, 8)
    layer.eval()
    for _ in range(2):  # eval: batch statistics without tracking, else the running ones
        evaluated = backend.to_numpy(layer(backend.asarray(host)))
        np.testing.assert_array_equal(evaluated,
                                      backend.to_numpy(layers[0].eval()(backend.asarray(host))))


@pytest.mark.skipif(not EMULATED, reason="needs NumPy and CuPy arrays side by side (the "
                    "emulated tier's CuPy, or a GPU's: tox -e emulated)")
def test_instance_norm_layer_follows_its_input_after_a_refused_mixed_call():
    """A functional call with mixed kinds that was refused must not leave an entry that lets a
    layer skip moving its state to its input's kind."""
    x = np.random.default_rng(7).standard_normal((2, 3, 4, 4)).astype(np.float32)
    layer = bn.InstanceNorm2d(3, track_running_stats=True).to("cupy").eval()
    with pytest.raises(TypeError, match="one kind"):
        bn.instance_norm(x, layer.running_mean, layer.running_var, use_input_stats=False)
    y = layer(x)  # numpy input: the state follows it
    assert isinstance(y, np.ndarray) and isinstance(layer.running_mean, np.ndarray)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("params", ["none", "float32", "float64", "strided float16"])
@pytest.mark.parametrize("rms", [False, True])
def test_small_rows_agree_with_the_engines(small_engine, monkeypatch, dtype, params, rms):
    """LayerNorm and RMSNorm under SMALL_ELEMENTS (one compiled call with Numba) give what the
    engines' passes give, whatever the parameters' dtype and strides."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3, 5, 8)) * 2 + 50).astype(dtype)
    assert x.size < nb.SMALL_ELEMENTS
    if params == "none":
        w = b = None
    else:
        pd = np.float16 if params.startswith("strided") else params
        w, b = (rng.uniform(0.5, 2, 16).astype(pd) for _ in range(2))
        w, b = (w[::2], b[::2]) if params.startswith("strided") else (w[:8], b[:8])

    def run():
        if rms:
            return bn.rms_norm_forward(x, 8, w)
        return bn.layer_norm_forward(x, 8, w, b)

    small = run()
    monkeypatch.setattr(nb, "SMALL_ELEMENTS", 0)
    general = run()
    for name, a, c in zip(("y", "mean", "rstd") if not rms else ("y", "rstd"), small, general,
                          strict=True):
        assert a.dtype == c.dtype and a.shape == c.shape, name
        eps = np.finfo(dtype).eps  # y = xhat * w + b may cancel: a few ulps at y's scale
        np.testing.assert_allclose(a, c, rtol=4 * eps, atol=8 * eps * np.abs(c).max(),
                                   err_msg=name)

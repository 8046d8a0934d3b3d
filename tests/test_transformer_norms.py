"""The normalizations transformers train with: RMSNorm, the fused residual add + LayerNorm /
RMSNorm (flash-attn's semantics) and bfloat16 on every op, on every backend, against a float64
oracle (tests/oracle.py's textbook formulas, no code shared with bncupy).

Tolerances: a result stored in dtype D is within ``eps(D) * |exact|`` (its rounding) plus an
absolute term of a few ``eps`` of D at the data's scale (float32 arithmetic for 16-bit data);
reductions (weight gradients) add one such term per row.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bncupy as bn
from bncupy._dtypes import BFLOAT16

DTYPES = [np.dtype(np.float16), BFLOAT16, np.dtype(np.float32), np.dtype(np.float64)]
F32 = np.dtype(np.float32)
# absolute error allowed at unit scale, per stored dtype: a few units of its precision (float32
# arithmetic behind 16-bit data)
ATOL = {np.dtype(np.float16): 4e-3, BFLOAT16: 3e-2, F32: 2e-5, np.dtype(np.float64): 1e-11}


def _eps(dtype: np.dtype) -> float:
    return float(np.finfo(dtype).eps)


def _close(actual, expected, dtype, scale=1.0, what="", extra=0.0):
    actual = np.asarray(actual).astype(np.float64)
    expected = np.asarray(expected, np.float64)
    bound = _eps(dtype) * np.abs(expected) + ATOL[np.dtype(dtype)] * scale + extra
    worst = np.max(np.abs(actual - expected) - bound, initial=-1.0)
    assert worst <= 0, f"{what}: off by {worst:.3g} beyond the bound (dtype {dtype})"


def _data(shape, dtype, seed, offset=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + offset).astype(dtype)


def _rows_oracle(h, dy, w, b, eps, rms):
    """y, rstd, dx, dw, db of LayerNorm (RMSNorm with ``rms``) over the last axis, float64."""
    h, dy = np.asarray(h, np.float64), np.asarray(dy, np.float64)
    n = h.shape[-1]
    w = np.ones(n) if w is None else np.asarray(w, np.float64)
    b = np.zeros(n) if b is None else np.asarray(b, np.float64)
    mean = np.zeros(h.shape[:-1] + (1,)) if rms else h.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((h - mean) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (h - mean) * rstd
    y = xhat * w + (0 if rms else b)
    g = dy * w
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True))
    if not rms:
        dx -= rstd * g.mean(-1, keepdims=True)
    flat = (-1, n)
    return (y, rstd[..., 0], dx, (dy * xhat).reshape(flat).sum(0), dy.reshape(flat).sum(0))


def _saved_mean_shift(h, dy, w, rstd):
    """How far LayerNorm's dx moves when the backward pass gets the mean as saved (float32 for
    16- and 32-bit data, off by half an ulp of it): through xhat, by
    ``rstd^2 * that * (|mean(g xhat)| + |xhat| |mean(g)|)``. Large for rows of nearly equal
    values (``rstd`` up to ``1/sqrt(eps)``), whatever the dtype."""
    saved = np.float64 if np.asarray(h).dtype == np.float64 else np.float32
    h, g = np.asarray(h, np.float64), np.asarray(dy, np.float64)
    if w is not None:
        g = g * np.asarray(w, np.float64)
    mean = h.mean(-1, keepdims=True)
    r = np.asarray(rstd, np.float64)[..., None]
    xhat = (h - mean) * r
    return (_eps(saved) / 2 * np.abs(mean) * r * r
            * (np.abs((g * xhat).mean(-1, keepdims=True))
               + np.abs(xhat) * np.abs(g.mean(-1, keepdims=True))))


@st.composite
def row_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    stream = draw(st.sampled_from(["none", "same", "fp32"] if dtype.itemsize == 2
                                  else ["none", "same"]))
    return {"rows": draw(st.integers(1, 6)), "lead": draw(st.integers(1, 3)),
            "hidden": draw(st.sampled_from([1, 2, 7, 8, 64, 100, 768, 3000])),
            "dtype": dtype, "stream": stream, "rms": draw(st.booleans()),
            "affine": draw(st.booleans()), "prenorm": draw(st.booleans()),
            "fp32": draw(st.booleans()), "offset": draw(st.sampled_from([0.0, 3.0])),
            "seed": draw(st.integers(0, 2**32 - 1))}


@given(case=row_cases())
def test_rms_and_layer_norm_with_residual_match_oracle(backend, case):
    """Forward (y, statistics, the sum h) and backward (dx with grad_prenorm, dw, db) of
    LayerNorm and RMSNorm with and without the fused residual add."""
    dtype, hidden, rms = case["dtype"], case["hidden"], case["rms"]
    shape = (case["lead"], case["rows"], hidden)
    x = _data(shape, dtype, case["seed"], case["offset"])
    residual = {"none": None, "same": _data(shape, dtype, case["seed"] + 1),
                "fp32": _data(shape, F32, case["seed"] + 1)}[case["stream"]]
    dy, g_sum = _data(shape, dtype, case["seed"] + 2), _data(shape, dtype, case["seed"] + 3)
    pdt = np.float64 if dtype == np.float64 else F32  # parameters
    w = _data((hidden,), pdt, case["seed"] + 4, 1.0, 0.5) if case["affine"] else None
    b = _data((hidden,), pdt, case["seed"] + 5) if case["affine"] and not rms else None
    fp32 = case["fp32"]
    eps = float(np.finfo(dtype).eps) if rms else 1e-5
    dev = [None if a is None else backend.asarray(a) for a in (x, residual, dy, g_sum, w, b)]
    dx_, dr, ddy, dg, dw_, db_ = dev
    if rms:
        out = bn.rms_norm_forward(dx_, hidden, dw_, residual=dr, residual_in_fp32=fp32)
        y, rstd = out[:2]
    else:
        out = bn.layer_norm_forward(dx_, hidden, dw_, db_, residual=dr, residual_in_fp32=fp32)
        y, mean, rstd = out[:3]
    stream = residual.dtype if residual is not None else \
        F32 if fp32 and dtype.itemsize == 2 else None
    assert len(out) == (2 if rms else 3) + (stream is not None)
    assert y.dtype == dtype and y.shape == shape and type(y) is type(dx_)
    assert rstd.shape == shape[:-1] and rstd.dtype == (np.float64 if dtype == np.float64
                                                       else np.float32)
    if stream is None:
        h = x
    else:
        h = backend.to_numpy(out[-1])
        assert h.dtype == stream and h.shape == shape
        exact = x.astype(np.float64) + (0 if residual is None else residual.astype(np.float64))
        _close(h, exact, stream, scale=0, what="h = x + residual")
    ref_y, ref_rstd, ref_dx, ref_dw, ref_db = _rows_oracle(h, dy, w, b, eps, rms)
    scale = 1.0 + case["offset"]
    _close(backend.to_numpy(y), ref_y, dtype, scale, "y")
    np.testing.assert_allclose(backend.to_numpy(rstd), ref_rstd, rtol=64 * _eps(
        np.float64 if dtype == np.float64 else np.float32) * scale)
    if not rms:
        np.testing.assert_allclose(backend.to_numpy(mean), h.astype(np.float64).mean(-1),
                                   rtol=1e-5 if dtype != np.float64 else 1e-12,
                                   atol=(ATOL[F32] if dtype != np.float64 else 1e-12) * scale)
    # the same through the functional call, with prenorm
    call = bn.rms_norm if rms else bn.layer_norm
    kw = {"residual": dr, "residual_in_fp32": fp32, "prenorm": case["prenorm"]}
    got = call(dx_, hidden, dw_, **({} if rms else {"bias": db_}), **kw)
    if case["prenorm"]:
        got, h2 = got
        if stream is None:
            assert h2 is dx_  # h is the input itself
        else:
            np.testing.assert_array_equal(backend.to_numpy(h2), h)
    np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(y))
    # backward: input is h; the gradient h gets from elsewhere is added
    h_dev = dx_ if stream is None else out[-1]
    grad_dtype = h.dtype
    if rms:
        gx, gw = bn.rms_norm_backward(ddy, h_dev, hidden, rstd, dw_, grad_prenorm=dg)
        gb = None
    else:
        gx, gw, gb = bn.layer_norm_backward(ddy, h_dev, hidden, mean, rstd, dw_, grad_prenorm=dg)
    assert gx.dtype == grad_dtype and gx.shape == shape
    rows = x.size // hidden
    pd = np.dtype(np.float64 if grad_dtype == np.float64 else np.float32)  # parameter grads
    _close(backend.to_numpy(gx), ref_dx + g_sum.astype(np.float64), grad_dtype, 4 * scale, "dx",
           0 if rms else _saved_mean_shift(h, dy, w, ref_rstd))
    _close(backend.to_numpy(gw).ravel(), ref_dw, pd, rows * scale, "dweight")
    if gb is not None:
        _close(backend.to_numpy(gb).ravel(), ref_db, pd, rows, "dbias")


@pytest.mark.parametrize("stream", ["none", "same"])
@pytest.mark.parametrize("hidden", [12288, 12290, 16384])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_rows_match_oracle(backend, dtype, hidden, stream):
    """Rows longer than a GPU thread's registers hold (the backward keeps them in shared memory:
    up to 16384 values, float64 8192, vectorized or not), as the cases above: LayerNorm and
    RMSNorm, the residual add, prenorm's gradient."""
    if dtype == np.float64:
        hidden //= 2
    inner = test_rms_and_layer_norm_with_residual_match_oracle.hypothesis.inner_test
    for rms in (False, True):
        inner(backend, {"rows": 3, "lead": 1, "hidden": hidden, "dtype": dtype,
                        "stream": stream, "rms": rms, "affine": True, "prenorm": True,
                        "fp32": False, "offset": 3.0, "seed": hidden + rms})


def test_rms_norm_eps_none_is_the_input_dtypes_machine_epsilon(backend):
    x = backend.asarray(_data((3, 16), BFLOAT16, 0) * 0.01)
    for dtype in DTYPES:
        xd = backend.asarray(backend.to_numpy(x).astype(dtype))
        eps = float(np.finfo(dtype).eps)
        np.testing.assert_array_equal(backend.to_numpy(bn.rms_norm(xd, 16)),
                                      backend.to_numpy(bn.rms_norm(xd, 16, eps=eps)))
    layer = bn.RMSNorm(16)
    assert layer.eps is None and repr(layer) == "RMSNorm((16,), eps=None, elementwise_affine=True)"


def test_rms_norm_layer_state_forward_and_backward(backend):
    x, dy = _data((4, 8), F32, 0, 2.0), _data((4, 8), F32, 1)
    layer = bn.RMSNorm(8, eps=1e-6)
    assert list(layer.state_dict()) == ["weight"]
    w = _data((8,), F32, 2, 1.0, 0.3)
    layer.load_state_dict({"weight": w})
    xd = backend.asarray(x)
    y = layer(xd)
    ref_y, _, ref_dx, ref_dw, _ = _rows_oracle(x, dy, w, None, 1e-6, True)
    _close(backend.to_numpy(y), ref_y, F32)
    _close(backend.to_numpy(layer.backward(backend.asarray(dy))), ref_dx, F32, 4)
    _close(backend.to_numpy(layer.grad_weight), ref_dw, F32, 4)
    assert bn.RMSNorm(8, elementwise_affine=False).state_dict() == {}


def test_layers_take_the_residual_and_pass_the_gradient_to_both(backend):
    """layer(x, residual=r, prenorm=True) -> (y, h); backward(dy, grad_prenorm) is the gradient
    of x and of r alike (in the residual stream's dtype), the functional backward's at h."""
    x, r = _data((5, 32), np.float16, 0), _data((5, 32), F32, 1)
    dy, gh = _data((5, 32), np.float16, 2), _data((5, 32), F32, 3)
    xd, rd, dyd, ghd = (backend.asarray(a) for a in (x, r, dy, gh))
    for layer in (bn.LayerNorm(32), bn.RMSNorm(32)):
        y, h = layer(xd, residual=rd, prenorm=True)
        assert y.dtype == np.float16 and h.dtype == np.float32
        grad = layer.backward(dyd, grad_prenorm=ghd)
        if isinstance(layer, bn.RMSNorm):
            _, rstd, h2 = bn.rms_norm_forward(xd, 32, layer.weight, residual=rd)
            ref, _ = bn.rms_norm_backward(dyd, h2, 32, rstd, layer.weight, grad_prenorm=ghd)
        else:
            _, m, s, h2 = bn.layer_norm_forward(xd, 32, layer.weight, layer.bias, residual=rd)
            ref, _, _ = bn.layer_norm_backward(dyd, h2, 32, m, s, layer.weight, grad_prenorm=ghd)
        np.testing.assert_array_equal(backend.to_numpy(h), backend.to_numpy(h2))
        # the layer keeps the forward's precise statistics; the functional call gets them
        # rounded to float32
        _close(backend.to_numpy(grad), backend.to_numpy(ref), F32, 4, type(layer).__name__)


# ------------------------------------------------------------------------- bfloat16 everywhere

def _as_float32(a):
    return None if a is None else np.asarray(a).astype(np.float32)


def _bf16_ops(x, dy, z):
    """(name, call(x, dy, z) -> output arrays) for every op family, channels first and last."""
    c = x.shape[1]
    pf = np.float32
    w, b = np.linspace(0.5, 1.5, c).astype(pf), np.linspace(-1, 1, c).astype(pf)
    wl, bl = np.linspace(0.5, 1.5, x.shape[-1]).astype(pf), np.zeros(x.shape[-1], pf)

    def bn_fwd_bwd(x, dy, z, xp):
        y, m, s = bn.batch_norm_forward(x, None, None, xp(w), xp(b), True)
        return (y, *bn.batch_norm_backward(dy, x, xp(w), m, s))

    def bn_cl(x, dy, z, xp):
        xl, dyl = x.transpose(0, 2, 3, 1), dy.transpose(0, 2, 3, 1)
        y, m, s = bn.batch_norm_forward(xl, None, None, xp(w), xp(b), True, axis=-1)
        return (y, *bn.batch_norm_backward(dyl, xl, xp(w), m, s, axis=-1))

    def fused(x, dy, z, xp):
        layer = bn.BatchNorm2d(c, activation="relu")
        y = layer(x, residual=z)
        return y, layer.backward(dy), layer.running_mean, layer.running_var

    def renorm(x, dy, z, xp):
        layer = bn.BatchNorm2d(c, renorm=True)
        layer(x)
        y = layer(x)
        return y, layer.backward(dy)

    def ghost(x, dy, z, xp):
        layer = bn.BatchNorm2d(c, ghost_batch_size=2)
        return layer(x), layer.backward(dy)

    def sync(x, dy, z, xp):
        layer = bn.SyncBatchNorm(c)
        return layer(x), layer.backward(dy)

    def eval_(x, dy, z, xp):
        layer = bn.BatchNorm2d(c)
        layer(x)
        layer.eval()
        return layer(x), layer.backward(dy)

    def group(x, dy, z, xp):
        y, m, s = bn.group_norm_forward(x, 2, xp(w), xp(b))
        return (y, *bn.group_norm_backward(dy, x, 2, m, s, xp(w)))

    def instance(x, dy, z, xp):
        layer = bn.InstanceNorm2d(c, affine=True, track_running_stats=True)
        return layer(x), layer.backward(dy), layer.running_mean

    def layer(x, dy, z, xp):
        y, m, s = bn.layer_norm_forward(x, x.shape[-1], xp(wl), xp(bl))
        return (y, *bn.layer_norm_backward(dy, x, x.shape[-1], m, s, xp(wl)))

    def rms(x, dy, z, xp):
        y, s = bn.rms_norm_forward(x, x.shape[-1], xp(wl), eps=1e-5)  # None: per dtype
        return (y, *bn.rms_norm_backward(dy, x, x.shape[-1], s, xp(wl)))

    return [("batch_norm NCHW", bn_fwd_bwd), ("batch_norm NHWC", bn_cl),
            ("BatchNorm2d relu+residual", fused), ("batch renorm", renorm), ("ghost", ghost),
            ("SyncBatchNorm", sync), ("BatchNorm2d eval", eval_), ("group_norm", group),
            ("InstanceNorm2d", instance), ("layer_norm", layer), ("rms_norm", rms)]


@pytest.mark.parametrize("offset", [0.0, 4.0])
def test_bfloat16_on_every_op_computes_as_float32_and_rounds(backend, offset):
    """Each op on bfloat16 data equals the same op on float32 copies of it (float32 statistics,
    parameters and running statistics) rounded to bfloat16: within one bfloat16 ulp of it, and
    float32 outputs (statistics, parameter gradients) within float32 reduction error."""
    x, dy, z = (_data((4, 6, 5, 3), BFLOAT16, s, offset if s == 0 else 0.0) for s in range(3))
    xp = backend.asarray
    for name, op in _bf16_ops(x, dy, z):
        got = op(*(xp(a) for a in (x, dy, z)), xp)
        ref = op(*(xp(_as_float32(a)) for a in (x, dy, z)), xp)
        for i, (g, r) in enumerate(zip(got, ref, strict=True)):
            g, r = backend.to_numpy(g), backend.to_numpy(r).astype(np.float64)
            if i == 0 or g.shape == x.shape or g.ndim == 4:
                assert g.dtype == BFLOAT16, (name, i, g.dtype)
                bound = 1.01 * _eps(BFLOAT16) * np.abs(r) + 1e-6 * (1 + np.abs(r).max())
            else:
                assert g.dtype == np.float32, (name, i, g.dtype)
                bound = 1e-5 * (1 + np.abs(r).max())
            assert np.all(np.abs(g.astype(np.float64) - r) <= bound), (name, i)


def test_bfloat16_running_statistics_are_refused_and_parameters_may_be_bfloat16(backend):
    x = backend.asarray(_data((4, 3, 2, 2), BFLOAT16, 0))
    rm = backend.asarray(np.zeros(3, np.float32).astype(BFLOAT16))
    with pytest.raises(TypeError, match="running_mean.*bfloat16"):
        bn.batch_norm(x, rm, backend.asarray(np.ones(3, np.float32)), training=True)
    layer = bn.LayerNorm(2, dtype=BFLOAT16)
    assert layer.weight.dtype == BFLOAT16
    y = layer(backend.asarray(_data((3, 2), BFLOAT16, 1)))
    assert y.dtype == BFLOAT16
    layer.backward(backend.asarray(_data((3, 2), BFLOAT16, 2)))
    assert layer.grad_weight.dtype == BFLOAT16


def test_bfloat16_nan_and_inf_propagate(backend):
    x = _data((2, 8), BFLOAT16, 0)
    x[0, 3] = np.nan
    x[1, 1] = np.inf
    y = backend.to_numpy(bn.rms_norm(backend.asarray(x), 8))
    assert np.isnan(y[0]).all() and np.isnan(y[1]).any()

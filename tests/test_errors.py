"""Bad input: a typed error that names the argument, and every array and layer left as it was."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import bncupy as bn


def _env() -> dict:
    rng = np.random.default_rng(0)
    layer = bn.BatchNorm2d(3)
    layer(rng.standard_normal((4, 3, 5, 5)).astype(np.float32))  # non-default state
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    y, m, s = bn.batch_norm_forward(x, None, None, training=True)
    return {
        "x": x, "dy": rng.standard_normal(x.shape).astype(np.float32),
        "rm": rng.standard_normal(3).astype(np.float32), "rv": np.ones(3, np.float32) * 2,
        "w": np.full(3, 1.5, np.float32), "b": np.full(3, 0.5, np.float32),
        "m": m, "s": s, "layer": layer,
    }


def fwd(e, **kw):
    args = {"input": e["x"], "running_mean": e["rm"], "running_var": e["rv"], "weight": e["w"],
            "bias": e["b"], "training": True, "momentum": 0.1, "eps": 1e-5}
    axis = kw.pop("axis", 1)
    args.update(kw)
    return bn.batch_norm_forward(**args, axis=axis)


def bwd(e, **kw):
    args = {"grad_output": e["dy"], "input": e["x"], "weight": e["w"], "save_mean": e["m"],
            "save_invstd": e["s"]}
    extra = {"training": kw.pop("training", True), "axis": kw.pop("axis", 1)}
    args.update(kw)
    return bn.batch_norm_backward(**args, **extra)


def _state(layer):
    return {k: np.array(v) for k, v in layer.state_dict().items()}


CASES = [
    # functional forward
    ("input list", lambda e: fwd(e, input=e["x"].tolist()), TypeError, "input"),
    ("input int dtype", lambda e: fwd(e, input=e["x"].astype(np.int32)), TypeError, "input"),
    ("input complex", lambda e: fwd(e, input=e["x"].astype(np.complex64)), TypeError, "input"),
    ("input bool", lambda e: fwd(e, input=e["x"] > 0), TypeError, "input"),
    ("input 1-D", lambda e: fwd(e, input=e["x"][0, 0, 0]), ValueError, "input"),
    ("input 0-D", lambda e: fwd(e, input=np.float32(1.0)), TypeError, "input"),
    ("axis out of range", lambda e: fwd(e, axis=4), ValueError, "axis"),
    ("axis negative out of range", lambda e: fwd(e, axis=-5), ValueError, "axis"),
    ("axis is batch axis", lambda e: fwd(e, axis=0), ValueError, "axis"),
    ("axis float", lambda e: fwd(e, axis=1.0), TypeError, "axis"),
    ("axis bool", lambda e: fwd(e, axis=True), TypeError, "axis"),
    ("running_mean wrong length", lambda e: fwd(e, running_mean=np.zeros(4, np.float32)),
     ValueError, "running_mean"),
    ("running_var 2-D", lambda e: fwd(e, running_var=np.ones((3, 1), np.float32)), ValueError,
     "running_var"),
    ("running_mean int", lambda e: fwd(e, running_mean=np.zeros(3, np.int64)), TypeError,
     "running_mean"),
    ("running_mean list", lambda e: fwd(e, running_mean=[0.0, 0.0, 0.0]), TypeError,
     "running_mean"),
    ("running_var only", lambda e: fwd(e, running_mean=None), ValueError, "running_mean"),
    ("running_mean read-only", lambda e: fwd(e, running_mean=np.broadcast_to(np.float32(0), (3,))),
     ValueError, "running_mean"),
    ("weight wrong length", lambda e: fwd(e, weight=np.ones(2, np.float32)), ValueError, "weight"),
    ("bias int", lambda e: fwd(e, bias=np.zeros(3, np.int32)), TypeError, "bias"),
    ("weight scalar", lambda e: fwd(e, weight=1.0), TypeError, "weight"),
    ("eps zero", lambda e: fwd(e, eps=0.0), ValueError, "eps"),
    ("eps negative", lambda e: fwd(e, eps=-1e-5), ValueError, "eps"),
    ("eps nan", lambda e: fwd(e, eps=float("nan")), ValueError, "eps"),
    ("eps inf", lambda e: fwd(e, eps=float("inf")), ValueError, "eps"),
    ("eps string", lambda e: fwd(e, eps="1e-5"), TypeError, "eps"),
    ("momentum above 1", lambda e: fwd(e, momentum=1.5), ValueError, "momentum"),
    ("momentum negative", lambda e: fwd(e, momentum=-0.1), ValueError, "momentum"),
    ("momentum nan", lambda e: fwd(e, momentum=float("nan")), ValueError, "momentum"),
    ("momentum None (functional)", lambda e: fwd(e, momentum=None), TypeError, "momentum"),
    ("training string", lambda e: fwd(e, training="yes"), TypeError, "training"),
    ("eval without running stats", lambda e: fwd(e, training=False, running_mean=None,
                                                 running_var=None), ValueError, "running_mean"),
    ("one value per channel", lambda e: fwd(e, input=e["x"][:1, :, :1, :1]), ValueError,
     "Expected more than 1 value per channel when training"),
    ("mixed kinds", lambda e: fwd(e, running_mean=_FakeCupy()), TypeError, "running_mean"),
    ("activation unknown", lambda e: fwd(e, activation="gelu"), ValueError, "activation"),
    ("activation not str", lambda e: fwd(e, activation=1), ValueError, "activation"),
    ("residual shape", lambda e: fwd(e, residual=e["x"][:2]), ValueError, "residual"),
    ("residual int", lambda e: fwd(e, residual=e["x"].astype(np.int32)), TypeError, "residual"),
    ("residual list", lambda e: fwd(e, residual=e["x"].tolist()), TypeError, "residual"),
    # functional backward
    ("grad_output shape", lambda e: bwd(e, grad_output=e["dy"][:2]), ValueError, "grad_output"),
    ("grad_output int", lambda e: bwd(e, grad_output=e["dy"].astype(np.int16)), TypeError,
     "grad_output"),
    ("grad_output tuple", lambda e: bwd(e, grad_output=(1.0,)), TypeError, "grad_output"),
    ("save_mean wrong length", lambda e: bwd(e, save_mean=np.zeros(5, np.float32)), ValueError,
     "save_mean"),
    ("save_invstd missing", lambda e: bwd(e, save_invstd=None), TypeError, "save_invstd"),
    ("backward weight wrong length", lambda e: bwd(e, weight=np.ones(4, np.float32)), ValueError,
     "weight"),
    ("backward training int", lambda e: bwd(e, training=1), TypeError, "training"),
    ("backward axis out of range", lambda e: bwd(e, axis=7), ValueError, "axis"),
    # statistics
    ("moments int", lambda e: bn.moments(np.arange(12).reshape(3, 4)), TypeError, "x"),
    ("welford 1-D", lambda e: bn.welford(np.zeros(5)), ValueError, "x"),
    ("welford axis", lambda e: bn.welford(e["x"], axis=9), ValueError, "axis"),
    ("merge other type", lambda e: bn.welford(e["x"]).merge((1, 2, 3)), TypeError, "other"),
    ("merge channel mismatch", lambda e: bn.welford(e["x"]).merge(bn.welford(e["x"][:, :2])),
     ValueError, "channels"),
    ("var ddof negative", lambda e: bn.welford(e["x"]).var(ddof=-1), ValueError, "ddof"),
    # layers
    ("num_features zero", lambda e: bn.BatchNorm2d(0), ValueError, "num_features"),
    ("num_features float", lambda e: bn.BatchNorm2d(3.0), TypeError, "num_features"),
    ("layer eps", lambda e: bn.BatchNorm1d(3, eps=0), ValueError, "eps"),
    ("layer momentum", lambda e: bn.BatchNorm3d(3, momentum=2), ValueError, "momentum"),
    ("layer affine", lambda e: bn.BatchNorm2d(3, affine="no"), TypeError, "affine"),
    ("layer dtype int", lambda e: bn.BatchNorm2d(3, dtype=np.int32), TypeError, "dtype"),
    ("layer dtype nonsense", lambda e: bn.BatchNorm2d(3, dtype="banana"), TypeError, "dtype"),
    ("layer wrong ndim", lambda e: e["layer"](e["x"][0]), ValueError, "4-D"),
    ("layer1d wrong ndim", lambda e: bn.BatchNorm1d(3)(e["x"]), ValueError, "2-D or 3-D"),
    ("layer wrong channels", lambda e: e["layer"](e["x"][:, :2]), ValueError, "num_features"),
    ("layer int input", lambda e: e["layer"](e["x"].astype(np.int8)), TypeError, "input"),
    ("layer one value per channel", lambda e: e["layer"](e["x"][:1, :, :1, :1]), ValueError,
     "Expected more than 1 value"),
    ("layer train mode", lambda e: e["layer"].train("eval"), TypeError, "mode"),
    ("layer backward shape", lambda e: e["layer"].backward(e["dy"][:1]), ValueError,
     "grad_output"),
    ("layer to", lambda e: e["layer"].to("gpu"), ValueError, "kind"),
    ("load_state_dict missing key", lambda e: e["layer"].load_state_dict(
        {k: v for k, v in e["layer"].state_dict().items() if k != "bias"}), ValueError, "bias"),
    ("load_state_dict extra key", lambda e: e["layer"].load_state_dict(
        {**e["layer"].state_dict(), "gamma": np.ones(3)}), ValueError, "gamma"),
    ("load_state_dict wrong shape", lambda e: e["layer"].load_state_dict(
        {**e["layer"].state_dict(), "running_var": np.ones(4, np.float32)}), ValueError,
     "running_var"),
    ("load_state_dict int dtype", lambda e: e["layer"].load_state_dict(
        {**e["layer"].state_dict(), "weight": np.ones(3, np.int64)}), TypeError, "weight"),
    ("load_state_dict list", lambda e: e["layer"].load_state_dict(
        {**e["layer"].state_dict(), "bias": [0.0, 0.0, 0.0]}), TypeError, "bias"),
    ("load_state_dict counter float", lambda e: e["layer"].load_state_dict(
        {**e["layer"].state_dict(), "num_batches_tracked": np.array(1.0)}), TypeError,
     "num_batches_tracked"),
    ("load_state_dict counter shape", lambda e: e["layer"].load_state_dict(
        {**e["layer"].state_dict(), "num_batches_tracked": np.array([1])}), ValueError,
     "num_batches_tracked"),
    ("load_state_dict not mapping", lambda e: e["layer"].load_state_dict([1, 2]), TypeError,
     "state"),
    ("layer activation", lambda e: bn.BatchNorm2d(3, activation="tanh"), ValueError,
     "activation"),
    ("layer residual shape", lambda e: e["layer"](e["x"], residual=e["x"][:, :2]), ValueError,
     "residual"),
    # folding
    ("fold weight channels", lambda e: bn.fold_into(np.ones((4, 3, 3, 3)), None, e["layer"]),
     ValueError, "num_features"),
    ("fold weight 1-D", lambda e: bn.fold_into(np.ones(3), None, e["layer"]), ValueError,
     "weight"),
    ("fold bias length", lambda e: bn.fold_into(np.ones((3, 2)), np.ones(2), e["layer"]),
     ValueError, "bias"),
    ("fold not a layer", lambda e: bn.fold_into(np.ones((3, 2)), None, "bn"), TypeError, "layer"),
    ("fold untracked", lambda e: bn.fold_into(np.ones((3, 2)), None,
                                              bn.BatchNorm1d(3, track_running_stats=False)),
     ValueError, "running statistics"),
    ("fold weight int", lambda e: bn.fold_into(np.ones((3, 2), np.int64), None, e["layer"]),
     TypeError, "weight"),
    # backends
    ("unknown backend", lambda e: bn.set_backend("tpu"), ValueError, "numpy"),
    ("backend not str", lambda e: bn.set_backend(1), TypeError, "backend"),
    ("use unknown backend", lambda e: bn.use_backend("jax").__enter__(), ValueError, "cupy"),
]


class _FakeCupy:
    """Classified as a cupy.ndarray by type (module ``cupy``, class ``ndarray``)."""

    dtype = np.dtype(np.float32)
    shape = (3,)
    ndim = 1


_FakeCupy.__name__ = "ndarray"
_FakeCupy.__module__ = "cupy"


def test_at_least_thirty_distinct_bad_inputs():
    assert len({name for name, *_ in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("name, call, error, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_typed_error_and_changes_nothing(name, call, error, fragment):
    env = _env()
    arrays = {k: v.copy() for k, v in env.items() if isinstance(v, np.ndarray)}
    layer_state = _state(env["layer"])
    layer_attrs = copy.copy(vars(env["layer"]))
    backend_before = bn.get_backend()
    with pytest.raises(error) as info:
        call(env)
    assert fragment in str(info.value)
    for key, before in arrays.items():
        np.testing.assert_array_equal(env[key], before, err_msg=f"{key} was modified")
    after = _state(env["layer"])
    assert after.keys() == layer_state.keys()
    for key in after:
        np.testing.assert_array_equal(after[key], layer_state[key], err_msg=key)
    assert env["layer"].training == layer_attrs["training"]
    assert env["layer"]._saved is layer_attrs["_saved"]
    assert bn.get_backend() == backend_before

"""Bad input: a typed error that names the argument, and every array and layer left as it was.

Two parts: ``CASES``, single bad inputs written out one by one, and a Hypothesis campaign over
classes of bad input (``CLASSES``): each class is one kind of badness (an int beyond float range,
an array where a str belongs, a running statistic that aliases the input, ...) tried against every
public function, constructor and layer method that takes such an argument, in every dtype and
both layouts. Every rejected call is checked the same way (:func:`assert_rejected`): the error's
type, the argument named in its message, and a bitwise snapshot of every array and all layer
state (parameters, statistics, counter, gradients, saved forward state) taken before the call.
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any, NamedTuple
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.lib.stride_tricks import as_strided

import bncupy as bn
from bncupy._dtypes import BFLOAT16
from bncupy.backends import dispatch
from tests.arrays import to_numpy
from tests.sync_world import ThreadWorld


def _env(dtype=np.float32, channels_last: bool = False) -> dict:
    """Valid arguments for every public function, and layers with non-default state (trained,
    with gradients and saved forward state), in one dtype and layout."""
    rng = np.random.default_rng(0)
    axis = -1 if channels_last else 1
    shape = (4, 5, 5, 3) if channels_last else (4, 3, 5, 5)
    pd = np.float64 if dtype == np.float64 else np.float32  # parameter dtype

    def data(seed_shift=0):
        return (rng.standard_normal(shape) * 2 + 1 + seed_shift).astype(dtype)

    def trained(layer, residual=None):
        layer(data(), residual=residual)
        layer.backward(data() * 0.5)
        return layer

    x = data()
    _, m, s = bn.batch_norm_forward(x, None, None, training=True, axis=axis)
    kw = {"channels_last": channels_last}
    parts = [bn.welford(x[:2], axis=axis), bn.welford(x[2:], axis=axis)]
    dy = data(-1)
    sum_dy, sum_dy_xmu = bn.batch_norm_backward_reduce(dy, x, m, s, axis=axis)
    ns = x.shape[-1:]  # LayerNorm over the last axis
    ln_w, ln_b = np.full(ns, 1.5, pd), np.full(ns, 0.5, pd)
    _, ln_m, ln_s = bn.layer_norm_forward(x, ns, ln_w, ln_b)
    _, rms_s = bn.rms_norm_forward(x, ns, ln_w)
    _, gn_m, gn_s = bn.group_norm_forward(x, 3, axis=axis)
    _, in_m, in_s = bn.instance_norm_forward(x, axis=axis)

    def trained_norm(layer):
        layer(data())
        layer.backward(data() * 0.5)
        return layer

    return {
        "ns": ns, "ln_w": ln_w, "ln_b": ln_b, "ln_m": ln_m, "ln_s": ln_s, "gn_m": gn_m,
        "gn_s": gn_s, "in_m": in_m, "in_s": in_s,
        "rms_s": rms_s,
        "ln": trained_norm(bn.LayerNorm(ns)),
        "rms": trained_norm(bn.RMSNorm(ns)),
        "gn": trained_norm(bn.GroupNorm(3, 3, **kw)),
        "inorm": trained_norm(bn.InstanceNorm2d(3, affine=True, track_running_stats=True, **kw)),
        "x": x, "dy": dy, "z": data(2), "axis": axis, "dtype": dtype,
        "rm": rng.standard_normal(3).astype(pd), "rv": np.ones(3, pd) * 2,
        "w": np.full(3, 1.5, pd), "b": np.full(3, 0.5, pd),
        "m": m, "s": s, "sum_dy": sum_dy, "sum_dy_xmu": sum_dy_xmu,
        "count": x.size // 3, "parts": parts, "conv_w": np.ones((3, 2, 3, 3), pd),
        "layer": trained(bn.BatchNorm2d(3, **kw)),
        "fused": trained(bn.BatchNorm2d(3, activation="relu", **kw), residual=data(3)),
        "sync": trained(bn.SyncBatchNorm(3, **kw)),
        "eval_layer": trained(bn.BatchNorm2d(3, **kw)).eval(),
    }


def fwd(e, **kw):
    args = {"input": e["x"], "running_mean": e["rm"], "running_var": e["rv"], "weight": e["w"],
            "bias": e["b"], "training": True, "momentum": 0.1, "eps": 1e-5}
    axis = kw.pop("axis", e["axis"])
    args.update(kw)
    return bn.batch_norm_forward(**args, axis=axis)


def bwd(e, **kw):
    args = {"grad_output": e["dy"], "input": e["x"], "weight": e["w"], "save_mean": e["m"],
            "save_invstd": e["s"]}
    extra = {"training": kw.pop("training", True), "axis": kw.pop("axis", e["axis"])}
    args.update(kw)
    return bn.batch_norm_backward(**args, **extra)


def elemt(e, **kw):
    args = {"input": e["x"], "weight": e["w"], "bias": e["b"], "mean": e["m"],
            "invstd": e["s"], "axis": e["axis"], **kw}
    return bn.batch_norm_elemt(**args)


def reduce(e, **kw):
    args = {"grad_output": e["dy"], "input": e["x"], "mean": e["m"], "invstd": e["s"],
            "axis": e["axis"], **kw}
    return bn.batch_norm_backward_reduce(**args)


def backward_elemt(e, **kw):
    args = {"grad_output": e["dy"], "input": e["x"], "mean": e["m"], "invstd": e["s"],
            "weight": e["w"], "sum_dy": e["sum_dy"], "sum_dy_xmu": e["sum_dy_xmu"],
            "count": e["count"], "axis": e["axis"], **kw}
    return bn.batch_norm_backward_elemt(**args)


def gather(e, **kw):
    args = {"partials": e["parts"], "running_mean": e["rm"], "running_var": e["rv"],
            "momentum": 0.1, "eps": 1e-5, **kw}
    return bn.batch_norm_gather_stats(**args)


def moments_of(e, **kw):
    part = e["parts"][0]
    args = {"count": part.count, "mean": part.mean, "m2": part.m2, **kw}
    return bn.Moments(**args)


def ln(e, **kw):
    args = {"input": e["x"], "normalized_shape": e["ns"], "weight": e["ln_w"],
            "bias": e["ln_b"], "eps": 1e-5, **kw}
    return bn.layer_norm_forward(**args)


def ln_bwd(e, **kw):
    args = {"grad_output": e["dy"], "input": e["x"], "normalized_shape": e["ns"],
            "mean": e["ln_m"], "rstd": e["ln_s"], "weight": e["ln_w"], **kw}
    return bn.layer_norm_backward(**args)


def rms(e, **kw):
    args = {"input": e["x"], "normalized_shape": e["ns"], "weight": e["ln_w"], "eps": 1e-5, **kw}
    return bn.rms_norm_forward(**args)


def rms_bwd(e, **kw):
    args = {"grad_output": e["dy"], "input": e["x"], "normalized_shape": e["ns"],
            "rstd": e["rms_s"], "weight": e["ln_w"], **kw}
    return bn.rms_norm_backward(**args)


def gn(e, **kw):
    args = {"input": e["x"], "num_groups": 3, "weight": e["w"], "bias": e["b"], "eps": 1e-5,
            "axis": e["axis"], **kw}
    return bn.group_norm_forward(**args)


def gn_bwd(e, **kw):
    args = {"grad_output": e["dy"], "input": e["x"], "num_groups": 3, "mean": e["gn_m"],
            "rstd": e["gn_s"], "weight": e["w"], "axis": e["axis"], **kw}
    return bn.group_norm_backward(**args)


def inorm(e, **kw):
    args = {"input": e["x"], "running_mean": e["rm"], "running_var": e["rv"], "weight": e["w"],
            "bias": e["b"], "use_input_stats": True, "momentum": 0.1, "eps": 1e-5,
            "axis": e["axis"], **kw}
    return bn.instance_norm_forward(**args)


def in_bwd(e, **kw):
    args = {"grad_output": e["dy"], "input": e["x"], "mean": e["in_m"], "rstd": e["in_s"],
            "weight": e["w"], "axis": e["axis"], **kw}
    return bn.instance_norm_backward(**args)


def renorm(e, **kw):
    args = {"input": e["x"], "running_mean": e["rm"], "running_var": e["rv"], "weight": e["w"],
            "bias": e["b"], "training": True, "momentum": 0.1, "eps": 1e-5, "rmax": 3.0,
            "dmax": 5.0, "axis": e["axis"], **kw}
    return bn.batch_renorm_forward(**args)


def renorm_bwd(e, **kw):
    args = {"grad_output": e["dy"], "input": e["x"], "weight": e["w"], "save_mean": e["m"],
            "save_invstd": e["s"], "r": e["s"] * 0 + 1.5, "d": e["s"] * 0 + 0.25,
            "axis": e["axis"], **kw}
    return bn.batch_renorm_backward(**args)


def load(e, key, value):
    return e["layer"].load_state_dict({**e["layer"].state_dict(), key: value})


def fake_cupy(shape, dtype=np.float32):
    """An object classified as a cupy.ndarray by type (module ``cupy``, class ``ndarray``)."""
    dtype = np.dtype(dtype)
    cls = type("ndarray", (), {"__module__": "cupy"})
    fake = cls()
    fake.dtype, fake.shape, fake.ndim = dtype, tuple(shape), len(shape)
    fake.size, fake.itemsize = int(np.prod(shape)), dtype.itemsize
    fake.strides = tuple(int(np.prod(shape[i + 1:])) * dtype.itemsize for i in range(len(shape)))
    return fake


# ---------------------------------------------------------------------------- the checks
def snapshot(value: Any) -> Any:
    """A bitwise picture of ``value``: arrays by identity, dtype, shape and bytes; tuples, lists
    and dicts element by element; bncupy's objects attribute by attribute; scalars by value;
    anything else (modules, communicators) by identity."""
    if isinstance(value, np.ndarray):
        return ("array", id(value), value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (tuple, list)):
        return (type(value), [snapshot(v) for v in value])
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str, np.generic, np.dtype, type)):
        return value
    if type(value).__module__.startswith("bncupy.") and hasattr(value, "__dict__"):
        return ("object", id(value), {k: snapshot(v) for k, v in vars(value).items()})
    return ("object", id(value))


def world_state(env: dict) -> dict:
    """Everything a rejected call must leave alone: the env's arrays (and what they view), every
    layer's attributes, the backend setting and the environment variables."""
    return {"env": snapshot(env),
            "backend": (dispatch.configured_backend(), bn.get_backend()),
            "environ": dict(os.environ)}


def assert_rejected(env: dict, call: Callable[[dict], Any], error: type,
                    names: tuple[str, ...]) -> BaseException:
    before = world_state(env)
    with pytest.raises(error) as info:
        call(env)
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not named in {type(info.value).__name__}: {message}"
    after = world_state(env)
    for key, value in before["env"].items():
        assert after["env"][key] == value, f"{key} changed"
    assert after == before
    return info.value


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
    ("mixed kinds", lambda e: fwd(e, running_mean=fake_cupy((3,))), TypeError, "running_mean"),
    ("activation unknown", lambda e: fwd(e, activation="gelu"), ValueError, "activation"),
    ("activation not str", lambda e: fwd(e, activation=1), TypeError, "activation"),
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
    ("fold a training-mode layer", lambda e: bn.fold_into(np.ones((3, 2)), None, e["layer"]),
     ValueError, "layer.eval()"),
    # backends
    ("unknown backend", lambda e: bn.set_backend("tpu"), ValueError, "numpy"),
    ("backend not str", lambda e: bn.set_backend(1), TypeError, "backend"),
    ("use unknown backend", lambda e: bn.use_backend("jax").__enter__(), ValueError, "cupy"),
]


def test_at_least_thirty_distinct_bad_inputs():
    assert len({name for name, *_ in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("name, call, error, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_typed_error_and_changes_nothing(name, call, error, fragment):
    assert_rejected(_env(), call, error, (fragment,))


# ---------------------------------------------------------------------------- the campaign
class Slot(NamedTuple):
    """One argument of one public callable: ``call(env, value)`` passes ``value`` for it."""

    label: str  # "callable argument"
    arg: str  # what the error message must name
    good: Any  # env key of a valid value (bad arrays derive shape and dtype from it), or a value
    call: Callable[[dict, Any], Any]
    mixes: bool = True  # other array arguments of the call make a CuPy array here a mixed call
    takes_none: bool = False  # None is valid here (or, for one running statistic, a ValueError)


class Bad(NamedTuple):
    """One concrete bad call: its label, the call, the names its error must contain."""

    label: str
    call: Callable[[dict], Any]
    names: tuple[str, ...]


class BadClass(NamedTuple):
    name: str
    error: type
    bads: Callable[[dict], list[Bad]]  # built from a fresh env (arrays made here join the env)


def layer_input_view(layer: Any, key: str, axis: int) -> np.ndarray:
    """A valid layer input (4-D, 3 channels, zero strides elsewhere) viewing ``layer.<key>``."""
    vec = getattr(layer, key)
    shape, strides = [2, 1, 1, 1], [0, 0, 0, 0]
    ax = axis % 4
    shape[ax], strides[ax] = 3, vec.strides[0]
    return as_strided(vec, tuple(shape), tuple(strides))


def channel_view(a: np.ndarray, axis: int) -> np.ndarray:
    """A (C,) view into ``a`` along its channel axis."""
    index = [0] * a.ndim
    index[axis] = slice(None)
    return a[tuple(index)]


def over(slots: list[Slot], values: dict[str, Callable[[dict, Any], Any]]) -> Callable:
    """Every slot with every bad value; a value is made from the env and the slot's good value."""

    def bads(e: dict) -> list[Bad]:
        out = []
        for slot in slots:
            good = e[slot.good] if isinstance(slot.good, str) and slot.good in e else slot.good
            for label, make in values.items():
                value = make(e, good)
                out.append(Bad(f"{slot.label} = {label}",
                               lambda e, slot=slot, value=value: slot.call(e, value),
                               (slot.arg,)))
        return out

    return bads


def const(value: Any) -> Callable[[dict, Any], Any]:
    return lambda e, good: value


def each(values: list[Any]) -> dict[str, Callable[[dict, Any], Any]]:
    return {repr(v) if len(repr(v)) < 30 else f"{type(v).__name__} #{i}": const(v)
            for i, v in enumerate(values)}


def explicit(*bads: Callable[[dict], Bad]) -> Callable[[dict], list[Bad]]:
    return lambda e: [make(e) for make in bads]


# Arguments, by role -------------------------------------------------------------------
DATA = [  # (N, C, ...) input arrays
    Slot("batch_norm_forward input", "input", "x", lambda e, a: fwd(e, input=a)),
    Slot("batch_norm input", "input", "x",
         lambda e, a: bn.batch_norm(a, None, None, training=True, axis=e["axis"]), mixes=False),
    Slot("batch_norm_backward input", "input", "x", lambda e, a: bwd(e, input=a)),
    Slot("moments x", "x", "x", lambda e, a: bn.moments(a, axis=e["axis"]), mixes=False),
    Slot("welford x", "x", "x", lambda e, a: bn.welford(a, axis=e["axis"]), mixes=False),
    Slot("batch_norm_stats input", "input", "x",
         lambda e, a: bn.batch_norm_stats(a, axis=e["axis"]), mixes=False),
    Slot("batch_norm_elemt input", "input", "x", lambda e, a: elemt(e, input=a)),
    Slot("batch_norm_backward_reduce input", "input", "x", lambda e, a: reduce(e, input=a)),
    Slot("batch_norm_backward_elemt input", "input", "x",
         lambda e, a: backward_elemt(e, input=a)),
    Slot("BatchNorm2d.__call__ input", "input", "x", lambda e, a: e["layer"](a), mixes=False),
    Slot("SyncBatchNorm.__call__ input", "input", "x", lambda e, a: e["sync"](a), mixes=False),
    Slot("fold_into weight", "weight", "conv_w",
         lambda e, a: bn.fold_into(a, e["b"], e["eval_layer"])),
    Slot("batch_renorm_forward input", "input", "x", lambda e, a: renorm(e, input=a)),
    Slot("batch_renorm input", "input", "x",
         lambda e, a: bn.batch_renorm(a, e["rm"], e["rv"], training=True, axis=e["axis"])),
    Slot("batch_renorm_backward input", "input", "x", lambda e, a: renorm_bwd(e, input=a)),
    Slot("layer_norm_forward input", "input", "x", lambda e, a: ln(e, input=a)),
    Slot("layer_norm input", "input", "x", lambda e, a: bn.layer_norm(a, e["ns"]), mixes=False),
    Slot("layer_norm_backward input", "input", "x", lambda e, a: ln_bwd(e, input=a)),
    Slot("rms_norm_forward input", "input", "x", lambda e, a: rms(e, input=a)),
    Slot("rms_norm input", "input", "x", lambda e, a: bn.rms_norm(a, e["ns"]), mixes=False),
    Slot("rms_norm_backward input", "input", "x", lambda e, a: rms_bwd(e, input=a)),
    Slot("RMSNorm.__call__ input", "input", "x", lambda e, a: e["rms"](a), mixes=False),
    Slot("group_norm_forward input", "input", "x", lambda e, a: gn(e, input=a)),
    Slot("group_norm input", "input", "x", lambda e, a: bn.group_norm(a, 3, axis=e["axis"]),
         mixes=False),
    Slot("group_norm_backward input", "input", "x", lambda e, a: gn_bwd(e, input=a)),
    Slot("instance_norm_forward input", "input", "x", lambda e, a: inorm(e, input=a)),
    Slot("instance_norm input", "input", "x", lambda e, a: bn.instance_norm(a, axis=e["axis"]),
         mixes=False),
    Slot("instance_norm_backward input", "input", "x", lambda e, a: in_bwd(e, input=a)),
    Slot("LayerNorm.__call__ input", "input", "x", lambda e, a: e["ln"](a), mixes=False),
    Slot("GroupNorm.__call__ input", "input", "x", lambda e, a: e["gn"](a), mixes=False),
    Slot("InstanceNorm2d.__call__ input", "input", "x", lambda e, a: e["inorm"](a),
         mixes=False),
]
LIKE_INPUT = [  # arrays that must have the input's shape
    Slot("batch_norm_forward residual", "residual", "z", lambda e, a: fwd(e, residual=a),
         takes_none=True),
    Slot("batch_norm_backward grad_output", "grad_output", "dy",
         lambda e, a: bwd(e, grad_output=a)),
    Slot("batch_norm_elemt residual", "residual", "z", lambda e, a: elemt(e, residual=a),
         takes_none=True),
    Slot("batch_norm_backward_reduce grad_output", "grad_output", "dy",
         lambda e, a: reduce(e, grad_output=a)),
    Slot("batch_norm_backward_elemt grad_output", "grad_output", "dy",
         lambda e, a: backward_elemt(e, grad_output=a)),
    Slot("BatchNorm2d.__call__ residual", "residual", "z",
         lambda e, a: e["fused"](e["x"], residual=a), takes_none=True),
    Slot("BatchNorm2d.backward grad_output", "grad_output", "dy",
         lambda e, a: e["layer"].backward(a)),
    Slot("BatchNorm2d(activation='relu').backward grad_output", "grad_output", "dy",
         lambda e, a: e["fused"].backward(a)),
    Slot("SyncBatchNorm.backward grad_output", "grad_output", "dy",
         lambda e, a: e["sync"].backward(a)),
    Slot("layer_norm_backward grad_output", "grad_output", "dy",
         lambda e, a: ln_bwd(e, grad_output=a)),
    Slot("group_norm_backward grad_output", "grad_output", "dy",
         lambda e, a: gn_bwd(e, grad_output=a)),
    Slot("instance_norm_backward grad_output", "grad_output", "dy",
         lambda e, a: in_bwd(e, grad_output=a)),
    Slot("LayerNorm.backward grad_output", "grad_output", "dy", lambda e, a: e["ln"].backward(a)),
    Slot("layer_norm_forward residual", "residual", "z", lambda e, a: ln(e, residual=a),
         takes_none=True),
    Slot("layer_norm residual", "residual", "z",
         lambda e, a: bn.layer_norm(e["x"], e["ns"], residual=a, prenorm=True), takes_none=True),
    Slot("layer_norm_backward grad_prenorm", "grad_prenorm", "dy",
         lambda e, a: ln_bwd(e, grad_prenorm=a), takes_none=True),
    Slot("LayerNorm.__call__ residual", "residual", "z", lambda e, a: e["ln"](e["x"], a),
         takes_none=True),
    Slot("LayerNorm.backward grad_prenorm", "grad_prenorm", "dy",
         lambda e, a: e["ln"].backward(e["dy"], a), takes_none=True),
    Slot("rms_norm_forward residual", "residual", "z", lambda e, a: rms(e, residual=a),
         takes_none=True),
    Slot("rms_norm_backward grad_output", "grad_output", "dy",
         lambda e, a: rms_bwd(e, grad_output=a)),
    Slot("rms_norm_backward grad_prenorm", "grad_prenorm", "dy",
         lambda e, a: rms_bwd(e, grad_prenorm=a), takes_none=True),
    Slot("RMSNorm.__call__ residual", "residual", "z",
         lambda e, a: e["rms"](e["x"], residual=a), takes_none=True),
    Slot("RMSNorm.backward grad_output", "grad_output", "dy", lambda e, a: e["rms"].backward(a)),
    Slot("GroupNorm.backward grad_output", "grad_output", "dy", lambda e, a: e["gn"].backward(a)),
    Slot("InstanceNorm2d.backward grad_output", "grad_output", "dy",
         lambda e, a: e["inorm"].backward(a)),
]
VECTORS = [  # per-channel vectors that are only read
    Slot("batch_norm_forward weight", "weight", "w", lambda e, a: fwd(e, weight=a),
         takes_none=True),
    Slot("batch_norm_forward bias", "bias", "b", lambda e, a: fwd(e, bias=a), takes_none=True),
    Slot("batch_norm_forward(training=False) running_mean", "running_mean", "rm",
         lambda e, a: fwd(e, running_mean=a, training=False), takes_none=True),
    Slot("batch_norm_forward(training=False) running_var", "running_var", "rv",
         lambda e, a: fwd(e, running_var=a, training=False), takes_none=True),
    Slot("batch_norm_backward weight", "weight", "w", lambda e, a: bwd(e, weight=a),
         takes_none=True),
    Slot("batch_norm_backward save_mean", "save_mean", "m", lambda e, a: bwd(e, save_mean=a)),
    Slot("batch_norm_backward save_invstd", "save_invstd", "s",
         lambda e, a: bwd(e, save_invstd=a)),
    Slot("batch_norm_elemt weight", "weight", "w", lambda e, a: elemt(e, weight=a),
         takes_none=True),
    Slot("batch_norm_elemt bias", "bias", "b", lambda e, a: elemt(e, bias=a), takes_none=True),
    Slot("batch_norm_elemt mean", "mean", "m", lambda e, a: elemt(e, mean=a)),
    Slot("batch_norm_elemt invstd", "invstd", "s", lambda e, a: elemt(e, invstd=a)),
    Slot("batch_norm_backward_reduce mean", "mean", "m", lambda e, a: reduce(e, mean=a)),
    Slot("batch_norm_backward_reduce invstd", "invstd", "s", lambda e, a: reduce(e, invstd=a)),
    Slot("batch_norm_backward_elemt weight", "weight", "w",
         lambda e, a: backward_elemt(e, weight=a), takes_none=True),
    Slot("batch_norm_backward_elemt sum_dy", "sum_dy", "sum_dy",
         lambda e, a: backward_elemt(e, sum_dy=a)),
    Slot("batch_norm_backward_elemt sum_dy_xmu", "sum_dy_xmu", "sum_dy_xmu",
         lambda e, a: backward_elemt(e, sum_dy_xmu=a)),
    Slot("Moments mean", "mean", "m", lambda e, a: moments_of(e, mean=a)),
    Slot("Moments m2", "m2", "m", lambda e, a: moments_of(e, m2=a)),
    Slot("fold_into bias", "bias", "b",
         lambda e, a: bn.fold_into(e["conv_w"], a, e["eval_layer"]), takes_none=True),
    Slot("BatchNorm2d.load_state_dict weight", "weight", "w", lambda e, a: load(e, "weight", a),
         mixes=False),
    Slot("BatchNorm2d.load_state_dict running_var", "running_var", "rv",
         lambda e, a: load(e, "running_var", a), mixes=False),
    Slot("batch_renorm_forward weight", "weight", "w", lambda e, a: renorm(e, weight=a),
         takes_none=True),
    Slot("batch_renorm_backward r", "r", "s", lambda e, a: renorm_bwd(e, r=a)),
    Slot("batch_renorm_backward d", "d", "s", lambda e, a: renorm_bwd(e, d=a)),
    Slot("layer_norm_forward weight", "weight", "ln_w", lambda e, a: ln(e, weight=a),
         takes_none=True),
    Slot("layer_norm_forward bias", "bias", "ln_b", lambda e, a: ln(e, bias=a), takes_none=True),
    Slot("layer_norm_backward weight", "weight", "ln_w", lambda e, a: ln_bwd(e, weight=a),
         takes_none=True),
    Slot("layer_norm_backward mean", "mean", "ln_m", lambda e, a: ln_bwd(e, mean=a)),
    Slot("layer_norm_backward rstd", "rstd", "ln_s", lambda e, a: ln_bwd(e, rstd=a)),
    Slot("rms_norm_forward weight", "weight", "ln_w", lambda e, a: rms(e, weight=a),
         takes_none=True),
    Slot("rms_norm_backward weight", "weight", "ln_w", lambda e, a: rms_bwd(e, weight=a),
         takes_none=True),
    Slot("rms_norm_backward rstd", "rstd", "rms_s", lambda e, a: rms_bwd(e, rstd=a)),
    Slot("RMSNorm.load_state_dict weight", "weight", "ln_w",
         lambda e, a: e["rms"].load_state_dict({"weight": a}), mixes=False),
    Slot("group_norm_forward weight", "weight", "w", lambda e, a: gn(e, weight=a),
         takes_none=True),
    Slot("group_norm_forward bias", "bias", "b", lambda e, a: gn(e, bias=a), takes_none=True),
    Slot("group_norm_backward mean", "mean", "gn_m", lambda e, a: gn_bwd(e, mean=a)),
    Slot("group_norm_backward rstd", "rstd", "gn_s", lambda e, a: gn_bwd(e, rstd=a)),
    Slot("group_norm_backward weight", "weight", "w", lambda e, a: gn_bwd(e, weight=a),
         takes_none=True),
    Slot("instance_norm_forward weight", "weight", "w", lambda e, a: inorm(e, weight=a),
         takes_none=True),
    Slot("instance_norm_forward(use_input_stats=False) running_var", "running_var", "rv",
         lambda e, a: inorm(e, running_var=a, use_input_stats=False), takes_none=True),
    Slot("instance_norm_backward mean", "mean", "in_m", lambda e, a: in_bwd(e, mean=a)),
    Slot("instance_norm_backward rstd", "rstd", "in_s", lambda e, a: in_bwd(e, rstd=a)),
    Slot("LayerNorm.load_state_dict weight", "weight", "ln_w",
         lambda e, a: e["ln"].load_state_dict({**e["ln"].state_dict(), "weight": a}),
         mixes=False),
]
WRITTEN = [  # per-channel vectors updated in place
    Slot("batch_norm_forward running_mean", "running_mean", "rm",
         lambda e, a: fwd(e, running_mean=a), takes_none=True),
    Slot("batch_norm_forward running_var", "running_var", "rv",
         lambda e, a: fwd(e, running_var=a), takes_none=True),
    Slot("batch_norm_gather_stats running_mean", "running_mean", "rm",
         lambda e, a: gather(e, running_mean=a), takes_none=True),
    Slot("batch_norm_gather_stats running_var", "running_var", "rv",
         lambda e, a: gather(e, running_var=a), takes_none=True),
    Slot("batch_renorm_forward running_mean", "running_mean", "rm",
         lambda e, a: renorm(e, running_mean=a), takes_none=True),
    Slot("instance_norm_forward running_mean", "running_mean", "rm",
         lambda e, a: inorm(e, running_mean=a), takes_none=True),
    Slot("instance_norm_forward running_var", "running_var", "rv",
         lambda e, a: inorm(e, running_var=a), takes_none=True),
]
ARRAYS = DATA + LIKE_INPUT + VECTORS + WRITTEN
REQUIRED = [s for s in ARRAYS if not s.takes_none]
EPS = [
    Slot("batch_norm_forward eps", "eps", None, lambda e, v: fwd(e, eps=v)),
    Slot("BatchNorm2d eps", "eps", None, lambda e, v: bn.BatchNorm2d(3, eps=v)),
    Slot("BatchNorm3d eps", "eps", None, lambda e, v: bn.BatchNorm3d(3, eps=v)),
    Slot("SyncBatchNorm eps", "eps", None, lambda e, v: bn.SyncBatchNorm(3, eps=v)),
    Slot("batch_norm_gather_stats eps", "eps", None, lambda e, v: gather(e, eps=v)),
    Slot("layer_norm_forward eps", "eps", None, lambda e, v: ln(e, eps=v)),
    Slot("group_norm_forward eps", "eps", None, lambda e, v: gn(e, eps=v)),
    Slot("instance_norm_forward eps", "eps", None, lambda e, v: inorm(e, eps=v)),
    Slot("LayerNorm eps", "eps", None, lambda e, v: bn.LayerNorm(3, eps=v)),
    Slot("GroupNorm eps", "eps", None, lambda e, v: bn.GroupNorm(1, 3, eps=v)),
    Slot("InstanceNorm1d eps", "eps", None, lambda e, v: bn.InstanceNorm1d(3, eps=v)),
]
MOMENTUM = [  # None is valid only for the layers (cumulative average)
    Slot("batch_norm_forward momentum", "momentum", None, lambda e, v: fwd(e, momentum=v)),
    Slot("batch_norm_gather_stats momentum", "momentum", None,
         lambda e, v: gather(e, momentum=v)),
    Slot("instance_norm_forward momentum", "momentum", None, lambda e, v: inorm(e, momentum=v)),
]
LAYER_MOMENTUM = [
    Slot("BatchNorm2d momentum", "momentum", None, lambda e, v: bn.BatchNorm2d(3, momentum=v)),
    Slot("SyncBatchNorm momentum", "momentum", None,
         lambda e, v: bn.SyncBatchNorm(3, momentum=v)),
    Slot("InstanceNorm3d momentum", "momentum", None,
         lambda e, v: bn.InstanceNorm3d(3, momentum=v)),
]
RMS_EPS = [  # None is valid: the input dtype's machine epsilon
    Slot("rms_norm_forward eps", "eps", None, lambda e, v: rms(e, eps=v)),
    Slot("rms_norm eps", "eps", None, lambda e, v: bn.rms_norm(e["x"], e["ns"], eps=v)),
    Slot("RMSNorm eps", "eps", None, lambda e, v: bn.RMSNorm(3, eps=v)),
]
REALS = EPS + RMS_EPS + MOMENTUM + LAYER_MOMENTUM
NUM_FEATURES = [
    Slot("BatchNorm1d num_features", "num_features", None, lambda e, v: bn.BatchNorm1d(v)),
    Slot("BatchNorm2d num_features", "num_features", None, lambda e, v: bn.BatchNorm2d(v)),
    Slot("SyncBatchNorm num_features", "num_features", None, lambda e, v: bn.SyncBatchNorm(v)),
    Slot("InstanceNorm2d num_features", "num_features", None,
         lambda e, v: bn.InstanceNorm2d(v, affine=True)),
    Slot("GroupNorm num_channels", "num_channels", None, lambda e, v: bn.GroupNorm(1, v)),
]
COUNTS = NUM_FEATURES + [
    Slot("batch_norm_backward_elemt count", "count", None,
         lambda e, v: backward_elemt(e, count=v)),
    Slot("Moments count", "count", None, lambda e, v: moments_of(e, count=v)),
    Slot("Moments.var ddof", "ddof", None, lambda e, v: e["parts"][0].var(ddof=v)),
    Slot("GroupNorm num_groups", "num_groups", None, lambda e, v: bn.GroupNorm(v, 6)),

    Slot("group_norm num_groups", "num_groups", None,
         lambda e, v: bn.group_norm(e["x"], v, axis=e["axis"])),
]
AXES = [
    Slot("batch_norm_forward axis", "axis", None, lambda e, v: fwd(e, axis=v)),
    Slot("batch_norm_backward axis", "axis", None, lambda e, v: bwd(e, axis=v)),
    Slot("moments axis", "axis", None, lambda e, v: bn.moments(e["x"], axis=v)),
    Slot("welford axis", "axis", None, lambda e, v: bn.welford(e["x"], axis=v)),
    Slot("batch_norm_stats axis", "axis", None, lambda e, v: bn.batch_norm_stats(e["x"], axis=v)),
    Slot("batch_norm_elemt axis", "axis", None, lambda e, v: elemt(e, axis=v)),
    Slot("batch_norm_backward_reduce axis", "axis", None, lambda e, v: reduce(e, axis=v)),
    Slot("batch_norm_backward_elemt axis", "axis", None, lambda e, v: backward_elemt(e, axis=v)),
    Slot("group_norm_forward axis", "axis", None, lambda e, v: gn(e, axis=v)),
    Slot("group_norm_backward axis", "axis", None, lambda e, v: gn_bwd(e, axis=v)),
    Slot("instance_norm_forward axis", "axis", None, lambda e, v: inorm(e, axis=v)),
    Slot("instance_norm_backward axis", "axis", None, lambda e, v: in_bwd(e, axis=v)),
]
BOOLS = [
    Slot("batch_norm_forward training", "training", None, lambda e, v: fwd(e, training=v)),
    Slot("batch_norm_backward training", "training", None, lambda e, v: bwd(e, training=v)),
    Slot("BatchNorm2d affine", "affine", None, lambda e, v: bn.BatchNorm2d(3, affine=v)),
    Slot("BatchNorm2d track_running_stats", "track_running_stats", None,
         lambda e, v: bn.BatchNorm2d(3, track_running_stats=v)),
    Slot("BatchNorm2d channels_last", "channels_last", None,
         lambda e, v: bn.BatchNorm2d(3, channels_last=v)),
    Slot("SyncBatchNorm affine", "affine", None, lambda e, v: bn.SyncBatchNorm(3, affine=v)),
    Slot("BatchNorm2d.train mode", "mode", None, lambda e, v: e["layer"].train(v)),
    Slot("instance_norm_forward use_input_stats", "use_input_stats", None,
         lambda e, v: inorm(e, use_input_stats=v)),
    Slot("LayerNorm elementwise_affine", "elementwise_affine", None,
         lambda e, v: bn.LayerNorm(3, elementwise_affine=v)),
    Slot("LayerNorm bias", "bias", None, lambda e, v: bn.LayerNorm(3, bias=v)),
    Slot("RMSNorm elementwise_affine", "elementwise_affine", None,
         lambda e, v: bn.RMSNorm(3, elementwise_affine=v)),
    Slot("layer_norm prenorm", "prenorm", None,
         lambda e, v: bn.layer_norm(e["x"], e["ns"], prenorm=v)),
    Slot("rms_norm prenorm", "prenorm", None,
         lambda e, v: bn.rms_norm(e["x"], e["ns"], residual=e["z"], prenorm=v)),
    Slot("layer_norm_forward residual_in_fp32", "residual_in_fp32", None,
         lambda e, v: ln(e, residual_in_fp32=v)),
    Slot("RMSNorm.__call__ residual_in_fp32", "residual_in_fp32", None,
         lambda e, v: e["rms"](e["x"], residual_in_fp32=v)),
    Slot("LayerNorm.__call__ prenorm", "prenorm", None,
         lambda e, v: e["ln"](e["x"], e["z"], prenorm=v)),
    Slot("GroupNorm affine", "affine", None, lambda e, v: bn.GroupNorm(1, 3, affine=v)),
    Slot("GroupNorm channels_last", "channels_last", None,
         lambda e, v: bn.GroupNorm(1, 3, channels_last=v)),
    Slot("InstanceNorm2d track_running_stats", "track_running_stats", None,
         lambda e, v: bn.InstanceNorm2d(3, track_running_stats=v)),
    Slot("InstanceNorm2d.train mode", "mode", None, lambda e, v: e["inorm"].train(v)),
]
NAMES = [  # str choices; ``good`` is a valid name
    Slot("batch_norm_forward activation", "activation", "relu",
         lambda e, v: fwd(e, activation=v)),
    Slot("batch_norm_elemt activation", "activation", "relu",
         lambda e, v: elemt(e, activation=v)),
    Slot("BatchNorm2d activation", "activation", "relu",
         lambda e, v: bn.BatchNorm2d(3, activation=v)),
    Slot("SyncBatchNorm activation", "activation", "relu",
         lambda e, v: bn.SyncBatchNorm(3, activation=v)),
    Slot("BatchNorm2d.to kind", "kind", "numpy", lambda e, v: e["layer"].to(v)),
    Slot("GroupNorm.to kind", "kind", "numpy", lambda e, v: e["gn"].to(v)),
    Slot("set_backend name", "backend", "numpy", lambda e, v: bn.set_backend(v)),
    Slot("use_backend name", "backend", "numpy", lambda e, v: bn.use_backend(v).__enter__()),
]
REQUIRED_NAMES = [s for s in NAMES if s.arg != "activation"]
DTYPES = [
    Slot("BatchNorm1d dtype", "dtype", None, lambda e, v: bn.BatchNorm1d(3, dtype=v)),
    Slot("BatchNorm2d dtype", "dtype", None, lambda e, v: bn.BatchNorm2d(3, dtype=v)),
    Slot("SyncBatchNorm dtype", "dtype", None, lambda e, v: bn.SyncBatchNorm(3, dtype=v)),
    Slot("LayerNorm dtype", "dtype", None, lambda e, v: bn.LayerNorm(3, dtype=v)),
    Slot("RMSNorm dtype", "dtype", None, lambda e, v: bn.RMSNorm(3, dtype=v)),
    Slot("GroupNorm dtype", "dtype", None, lambda e, v: bn.GroupNorm(1, 3, dtype=v)),
    Slot("InstanceNorm2d dtype", "dtype", None, lambda e, v: bn.InstanceNorm2d(3, dtype=v)),
]
NUMPY_BACKEND_CALLS = [  # every call that computes on the NumPy backend
    Slot("batch_norm_forward", "BNCUPY_NUM_THREADS", None, lambda e, v: fwd(e)),
    Slot("batch_norm_backward", "BNCUPY_NUM_THREADS", None, lambda e, v: bwd(e)),
    Slot("moments", "BNCUPY_NUM_THREADS", None, lambda e, v: bn.moments(e["x"], e["axis"])),
    Slot("batch_norm_elemt", "BNCUPY_NUM_THREADS", None, lambda e, v: elemt(e)),
    Slot("batch_norm_backward_elemt", "BNCUPY_NUM_THREADS", None, lambda e, v: backward_elemt(e)),
    Slot("BatchNorm2d.__call__", "BNCUPY_NUM_THREADS", None, lambda e, v: e["layer"](e["x"])),
]
COUNTER = "num_batches_tracked"


# Bad values, by kind ------------------------------------------------------------------
NOT_ARRAYS = {
    "a list": lambda e, g: g.tolist(),
    "a tuple": lambda e, g: tuple(np.ravel(g).tolist()),
    "a float": const(1.0),
    "a NumPy scalar": lambda e, g: g.dtype.type(1),
    "a str": const("array"),
    "a dict": lambda e, g: {"data": g},
}
NOT_FLOAT = {
    "int32": lambda e, g: g.astype(np.int32),
    "uint8": lambda e, g: g.astype(np.uint8),
    "bool": lambda e, g: g > 0,
    "complex64": lambda e, g: g.astype(np.complex64),
    "object": lambda e, g: g.astype(object),
    "str <U3": lambda e, g: g.astype("<U3"),
    "datetime64": lambda e, g: np.zeros(g.shape, "datetime64[s]"),
    "structured f4,f4": lambda e, g: np.zeros(g.shape, "f4,f4"),
}
if np.dtype(np.longdouble) != np.dtype(np.float64):
    NOT_FLOAT["longdouble"] = lambda e, g: g.astype(np.longdouble)


def _other_float(dtype: np.dtype) -> np.dtype:
    """A float dtype that is neither ``dtype`` nor float32 (so no residual stream)."""
    return np.dtype(np.float64 if dtype != np.float64 else np.float16)


def _flip(e: dict, good: np.ndarray) -> np.ndarray:
    return good.astype(good.dtype.newbyteorder())


def _zero_stride(e: dict, good: np.ndarray) -> np.ndarray:
    return as_strided(np.zeros(1, good.dtype), good.shape, (0,), writeable=True)


def _sub_element_stride(e: dict, good: np.ndarray) -> np.ndarray:
    base = np.zeros(good.size + good.itemsize, good.dtype)
    return as_strided(base, good.shape, (1,), writeable=True)


def _read_only(e: dict, good: np.ndarray) -> np.ndarray:
    out = good.copy()
    out.flags.writeable = False
    return out


def _bad(label: str, names: tuple[str, ...], call: Callable[[dict], Any],
         made: Callable[[dict], dict] = lambda e: {}) -> Callable[[dict], Bad]:
    """One bad call written out; ``made(e)`` prepares it (arrays it returns join the env, so
    that the snapshot covers them, and are passed to ``call`` with it)."""

    def bad(e: dict) -> Bad:
        extra = made(e)
        e.update({f"{label}: {key}": value for key, value in extra.items()})
        return Bad(label, lambda e: call({**e, **extra}), names)

    return bad


def _with_threads(value: str, slot: Slot, e: dict) -> Any:
    with mock.patch.dict(os.environ, {"BNCUPY_NUM_THREADS": value}):
        return slot.call(e, None)


def _full_counter(layer: Any) -> dict:
    """Set ``layer``'s batch counter to its int64 maximum (before the snapshot)."""
    layer.load_state_dict({**layer.state_dict(), COUNTER: np.array(2**63 - 1)})
    return {}


def _overlapping_pair(e: dict) -> dict:
    buf = np.arange(5, dtype=e["rm"].dtype) + 1
    return {"buf": buf, "first": buf[:3], "second": buf[2:]}


def _input_after_vector(e: dict) -> dict:
    """An input whose memory begins 2 elements into a buffer that also holds a (3,) vector."""
    x = e["x"]
    buf = np.ones(x.size + 2, x.dtype)
    xin = buf[2:].reshape(x.shape)
    xin[...] = x
    return {"buf": buf, "input": xin, "vector": buf[:3]}


CLASSES = [
    # arrays --------------------------------------------------------------------------
    BadClass("array argument given as a non-array (list, tuple, scalar, str, dict)", TypeError,
             over(ARRAYS, NOT_ARRAYS)),
    BadClass("required array argument given as None", TypeError,
             over(REQUIRED, {"None": const(None)})),
    BadClass("array argument with a non-float dtype", TypeError, over(ARRAYS, NOT_FLOAT)),
    BadClass("array argument with a float dtype in non-native byte order", TypeError,
             over(ARRAYS, {"byte-swapped": _flip})),
    BadClass("array argument given as a masked array", TypeError,
             over(ARRAYS, {"masked": lambda e, g: np.ma.masked_array(g, mask=np.zeros_like(
                 g, bool))})),
    BadClass("array argument of the other array kind (CuPy among NumPy)", TypeError,
             over([s for s in ARRAYS if s.mixes],
                  {"cupy": lambda e, g: fake_cupy(g.shape, g.dtype)})),
    BadClass("input with fewer than 2 dimensions", ValueError,
             over(DATA + LIKE_INPUT, {"0-D": lambda e, g: np.array(1.0, g.dtype),
                                      "1-D": lambda e, g: np.ravel(g)})),
    BadClass("input-shaped array of another shape", ValueError,
             over(LIKE_INPUT, {"fewer samples": lambda e, g: g[:2],
                               "extra axis": lambda e, g: g[None],
                               "transposed": lambda e, g: np.swapaxes(g, 0, -1)})),
    BadClass("per-channel vector of the wrong shape", ValueError,
             over(VECTORS + WRITTEN, {"0-D": lambda e, g: np.array(1.0, g.dtype),
                                      "2-D": lambda e, g: g.reshape(1, -1),
                                      "C+1 long": lambda e, g: np.ones(4, g.dtype),
                                      "empty": lambda e, g: np.ones(0, g.dtype)})),
    BadClass("in-place vector that is read-only", ValueError, over(WRITTEN, {
        "read-only": _read_only,
        "broadcast": lambda e, g: np.broadcast_to(g[:1], g.shape)})),
    BadClass("in-place vector whose elements overlap (zero or sub-element stride)", ValueError,
             over(WRITTEN, {"zero stride": _zero_stride, "1-byte stride": _sub_element_stride})),
    # aliasing ------------------------------------------------------------------------
    BadClass("running statistics that are one array", ValueError, explicit(
        _bad("batch_norm_forward running_mean is running_var",
             ("running_mean", "running_var"),
             lambda e: fwd(e, running_mean=e["rm"], running_var=e["rm"])),
        _bad("batch_norm running_mean is a view of running_var", ("running_mean", "running_var"),
             lambda e: bn.batch_norm(e["x"], e["rv"][:], e["rv"], training=True,
                                     axis=e["axis"])),
        _bad("batch_norm_gather_stats running_mean is running_var",
             ("running_mean", "running_var"),
             lambda e: gather(e, running_mean=e["rv"], running_var=e["rv"])),
    )),
    BadClass("instance norm running statistics that are one array or view the input",
             ValueError, explicit(
                 _bad("instance_norm_forward running_mean is running_var",
                      ("running_mean", "running_var"),
                      lambda e: inorm(e, running_mean=e["rv"], running_var=e["rv"])),
                 _bad("instance_norm_forward running_var views input", ("running_var", "input"),
                      lambda e: inorm(e, running_var=channel_view(e["x"], e["axis"]))),
             )),
    BadClass("batch renormalization limits out of range", ValueError,
             over([Slot("batch_renorm_forward rmax", "rmax", None, lambda e, v: renorm(e, rmax=v)),
                   Slot("batch_renorm_forward dmax", "dmax", None,
                        lambda e, v: renorm(e, dmax=v * -1 if v > 0 else v)),
                   Slot("BatchNorm2d rmax", "rmax", None,
                        lambda e, v: bn.BatchNorm2d(3, renorm=True, rmax=v))],
                  each([0.5, -1.0, float("nan"), float("inf"), 10**400]))),
    BadClass("ghost_batch_size not a count >= 1", ValueError,
             over([Slot("BatchNorm2d ghost_batch_size", "ghost_batch_size", None,
                        lambda e, v: bn.BatchNorm2d(3, ghost_batch_size=v))],
                  each([0, -1, 2**63]))),
    BadClass("ghost_batch_size not an int", TypeError,
             over([Slot("BatchNorm2d ghost_batch_size", "ghost_batch_size", None,
                        lambda e, v: bn.BatchNorm2d(3, ghost_batch_size=v))],
                  each([2.5, "3", True, np.array(3), [3]]))),
    BadClass("renorm or ghost batches that cannot work", ValueError, explicit(
        _bad("BatchNorm2d renorm without running statistics", ("track_running_stats",),
             lambda e: bn.BatchNorm2d(3, renorm=True, track_running_stats=False)),
        _bad("BatchNorm2d renorm with a fused activation", ("activation",),
             lambda e: bn.BatchNorm2d(3, renorm=True, activation="relu")),
        _bad("batch_renorm_forward without running statistics", ("running_mean",),
             lambda e: renorm(e, running_mean=None, running_var=None)),
        _bad("BatchNorm2d.__call__ with a one-sample ghost batch", ("Expected more than 1 value",),
             lambda e: bn.BatchNorm2d(3, ghost_batch_size=3, channels_last=e["axis"] == -1)(
                 e["x"][:, :, :1, :1] if e["axis"] == 1 else e["x"][:, :1, :1, :])),
    )),
    BadClass("normalized_shape that does not match the input", ValueError,
             over([Slot("layer_norm_forward normalized_shape", "normalized_shape", None,
                        lambda e, v: ln(e, normalized_shape=v, weight=None, bias=None)),
                   Slot("LayerNorm.__call__ normalized_shape", "normalized_shape", None,
                        lambda e, v: bn.LayerNorm(v)(e["x"])),
                   Slot("rms_norm_backward normalized_shape", "normalized_shape", None,
                        lambda e, v: rms_bwd(e, normalized_shape=v, weight=None))],
                  each([(7,), (5, 5, 5, 5, 5), (2, 3), 0]))),
    BadClass("normalized_shape not an int or sequence of ints", TypeError,
             over([Slot("layer_norm_forward normalized_shape", "normalized_shape", None,
                        lambda e, v: ln(e, normalized_shape=v, weight=None, bias=None)),
                   Slot("LayerNorm normalized_shape", "normalized_shape", None,
                        lambda e, v: bn.LayerNorm(v)),
                   Slot("RMSNorm normalized_shape", "normalized_shape", None,
                        lambda e, v: bn.RMSNorm(v))],
                  each([3.0, "5", None, (5.0,), (True,), [], np.array([5.0])]))),
    BadClass("residual of a dtype that is neither input's nor a float32 stream", TypeError,
             explicit(
                 _bad("layer_norm_forward residual of another dtype", ("residual",),
                      lambda e: ln(e, residual=e["other"]),
                      lambda e: {"other": e["z"].astype(_other_float(e["x"].dtype))}),
                 _bad("RMSNorm.__call__ residual of another dtype", ("residual",),
                      lambda e: e["rms"](e["x"], residual=e["other"]),
                      lambda e: {"other": e["z"].astype(_other_float(e["x"].dtype))}),
             )),
    BadClass("bfloat16 statistics updated in place", TypeError, explicit(
        _bad("batch_norm_forward running_mean in bfloat16", ("running_mean", "bfloat16"),
             lambda e: fwd(e, running_mean=e["bf16"]),
             lambda e: {"bf16": e["rm"].astype(BFLOAT16)}),
        _bad("instance_norm_forward running_var in bfloat16", ("running_var", "bfloat16"),
             lambda e: inorm(e, running_var=e["bf16"]),
             lambda e: {"bf16": e["rv"].astype(BFLOAT16)}),
    )),
    BadClass("num_groups that does not divide the channels", ValueError,
             over([Slot("group_norm_forward num_groups", "num_groups", None,
                        lambda e, v: gn(e, num_groups=v)),
                   Slot("GroupNorm num_groups", "num_groups", None,
                        lambda e, v: bn.GroupNorm(v, 6))],
                  each([4, 5, 7]))),
    BadClass("instance statistics of one value per (sample, channel)", ValueError, explicit(
        _bad("instance_norm_forward on (N, C)", ("Expected more than 1 spatial element",),
             lambda e: bn.instance_norm(e["x"][:, :, 0, 0] if e["axis"] == 1
                                        else e["x"][:, 0, 0, :], axis=e["axis"])),
        _bad("InstanceNorm2d.__call__ on 1x1 planes", ("Expected more than 1 spatial element",),
             lambda e: e["inorm"](e["x"][:, :, :1, :1] if e["axis"] == 1
                                  else e["x"][:, :1, :1, :])),
    )),
    BadClass("running statistic that is a view of the input", ValueError, explicit(
        _bad("batch_norm_forward running_mean views input", ("running_mean", "input"),
             lambda e: fwd(e, running_mean=channel_view(e["x"], e["axis"]))),
        _bad("batch_norm_forward running_var views input", ("running_var", "input"),
             lambda e: fwd(e, running_var=channel_view(e["x"], e["axis"]))),
        _bad("BatchNorm2d.__call__ input views running_mean", ("running_mean", "input"),
             lambda e: e["layer"](e["view"]),
             lambda e: {"view": layer_input_view(e["layer"], "running_mean", e["axis"])}),
        _bad("BatchNorm2d.__call__ input views running_var", ("running_var", "input"),
             lambda e: e["layer"](e["view"]),
             lambda e: {"view": layer_input_view(e["layer"], "running_var", e["axis"])}),
        _bad("SyncBatchNorm.__call__ input views running_mean", ("running_mean", "input"),
             lambda e: e["sync"](e["view"]),
             lambda e: {"view": layer_input_view(e["sync"], "running_mean", e["axis"])}),
    )),
    BadClass("running statistic that is weight, bias or a view of them", ValueError, explicit(
        _bad("batch_norm_forward running_mean is weight", ("running_mean", "weight"),
             lambda e: fwd(e, running_mean=e["w"])),
        _bad("batch_norm_forward running_var is bias", ("running_var", "bias"),
             lambda e: fwd(e, running_var=e["b"])),
        _bad("batch_norm_forward running_var views weight", ("running_var", "weight"),
             lambda e: fwd(e, running_var=e["w"][::-1])),
    )),
    BadClass("running statistic that is a view of the residual", ValueError, explicit(
        _bad("batch_norm_forward running_mean views residual", ("running_mean", "residual"),
             lambda e: fwd(e, residual=e["z"], running_mean=channel_view(e["z"], e["axis"]))),
    )),
    BadClass("running statistics that overlap partially", ValueError, explicit(
        _bad("batch_norm_forward running_mean/var share one element",
             ("running_mean", "running_var"),
             lambda e: fwd(e, running_mean=e["first"], running_var=e["second"]),
             _overlapping_pair),
        _bad("batch_norm_gather_stats running_mean/var share one element",
             ("running_mean", "running_var"),
             lambda e: gather(e, running_mean=e["second"], running_var=e["first"]),
             _overlapping_pair),
        _bad("batch_norm_forward running_mean ends where the input begins",
             ("running_mean", "input"),
             lambda e: fwd(e, input=e["input"], running_mean=e["vector"]),
             _input_after_vector),
    )),
    BadClass("running statistic that is a partial's mean or m2", ValueError, explicit(
        _bad("batch_norm_gather_stats running_mean is partials[0].mean",
             ("running_mean", "partials[0].mean"),
             lambda e: gather(e, running_mean=e["parts"][0].mean)),
        _bad("batch_norm_gather_stats running_var is partials[1].m2",
             ("running_var", "partials[1].m2"),
             lambda e: gather(e, running_var=e["parts"][1].m2)),
    )),
    # real scalars --------------------------------------------------------------------
    BadClass("eps/momentum: an int beyond float range", ValueError,
             over(REALS, each([10**400, -10**400]))),
    BadClass("eps/momentum: a Fraction beyond float range", ValueError,
             over(REALS, each([Fraction(10**400, 3)]))),
    BadClass("eps/momentum: NaN or infinite", ValueError,
             over(REALS, each([float("nan"), float("inf"), -float("inf"), np.float32("nan")]))),
    BadClass("eps: zero or negative", ValueError,
             over(EPS + RMS_EPS, each([0, 0.0, -0.0, -1e-5]))),
    BadClass("momentum: outside [0, 1]", ValueError,
             over(MOMENTUM + LAYER_MOMENTUM, each([1.5, -0.1, np.float64(1.000001), 2]))),
    BadClass("eps/momentum: a str", TypeError, over(REALS, each(["1e-5", "0.1"]))),
    BadClass("eps/momentum: a bool", TypeError, over(REALS, each([True, False]))),
    BadClass("eps/momentum: a complex number", TypeError,
             over(REALS, each([1e-5 + 0j, np.complex64(0.1)]))),
    BadClass("eps/momentum: a NumPy array (0-D or 1-D)", TypeError,
             over(REALS, each([np.array(1e-5), np.array([0.1])]))),
    BadClass("eps/momentum: a list or Decimal", TypeError,
             over(REALS, each([[1e-5], Decimal("0.1")]))),
    BadClass("eps/momentum where None is not allowed: None", TypeError,
             over(EPS + MOMENTUM, each([None]))),
    # integer scalars -----------------------------------------------------------------
    BadClass("count/num_features/ddof: an int beyond int64", ValueError,
             over(COUNTS, each([2**63, 10**400]))),
    BadClass("count/num_features/ddof: negative", ValueError, over(COUNTS, each([-1, -10**400]))),
    BadClass("count/num_features/ddof: a float (fractional or not)", TypeError,
             over(COUNTS, each([2.5, 3.0, np.float64(3)]))),
    BadClass("count/num_features/ddof: bool, str, None, array or list", TypeError,
             over(COUNTS, each([True, "3", None, np.array(3), np.array([3]), [3]]))),
    BadClass("num_features: zero", ValueError, over(NUM_FEATURES, each([0]))),
    BadClass("num_features: more bytes than an address space", ValueError,
             over(NUM_FEATURES, each([2**62]))),
    BadClass("num_features: more memory than any machine has", MemoryError,
             over(NUM_FEATURES, each([2**46]))),
    BadClass("batch_norm_backward_elemt count below the local count", ValueError,
             over([s for s in COUNTS if s.arg == "count" and "elemt" in s.label],
                  each([0, 1]))),
    BadClass("axis: out of range", ValueError,
             over(AXES, each([4, -5, 10**400, -10**400]))),
    BadClass("axis: the batch axis", ValueError, over(AXES, each([0, -4, np.int64(0)]))),
    BadClass("axis: not an int", TypeError,
             over(AXES, each([1.0, "1", None, True, np.array(1), [1]]))),
    # bools, names, dtypes ------------------------------------------------------------
    BadClass("bool argument: not a bool", TypeError,
             over(BOOLS, each(["yes", 1, 0, None, 1.0, np.array(True), [True]]))),
    BadClass("name argument: an unknown name", ValueError,
             over(NAMES, each(["no-such-name", "", "relu "]))),
    BadClass("name argument: an array of str", TypeError,
             over(NAMES, {"1-D array": lambda e, g: np.array([g]),
                          "0-D array": lambda e, g: np.array(g)})),
    BadClass("name argument: bytes, list, int", TypeError,
             over(NAMES, {"bytes": lambda e, g: g.encode(), "list": lambda e, g: [g],
                          "int": const(1)})),
    BadClass("name argument where None is not allowed: None", TypeError,
             over(REQUIRED_NAMES, each([None]))),
    BadClass("dtype: numpy.dtype cannot construct it", TypeError, over(DTYPES, each([
        "banana", ("f4", -1), "f4,(", [("a", "f4"), ("a", "f4")], ("f4", 2**63), 1.5, object(),
        {"names": ["a"], "formats": ["f4"], "offsets": [-1]}]))),
    BadClass("dtype: not float16/32/64", TypeError, over(DTYPES, each([
        np.int32, "complex64", "f4,f4", ">f8" if np.little_endian else "<f8", np.longdouble
        if np.dtype(np.longdouble) != np.dtype(np.float64) else "i8", "datetime64[s]"]))),
    BadClass("dtype: an array", TypeError, over(DTYPES, {
        "float array": lambda e, g: np.zeros(3, np.float32),
        "str array": lambda e, g: np.array(["float32"])})),
    # environment ---------------------------------------------------------------------
    BadClass("BNCUPY_NUM_THREADS not an integer >= 1", ValueError,
             lambda e: [Bad(f"{slot.label} with BNCUPY_NUM_THREADS={value!r}",
                            lambda e, slot=slot, value=value: _with_threads(value, slot, e),
                            ("BNCUPY_NUM_THREADS",))
                        for slot in NUMPY_BACKEND_CALLS
                        for value in ("two", "0", "-3", "1.5", " ", "4 threads")]),
    # Moments and the SyncBatchNorm building blocks ------------------------------------
    BadClass("batch_norm_gather_stats partials: not a sequence of Moments", TypeError,
             over([Slot("batch_norm_gather_stats partials", "partials", "parts",
                        lambda e, v: gather(e, partials=v))], {
                 "one Moments": lambda e, g: g[0], "generator": lambda e, g: iter(g),
                 "dict": lambda e, g: dict(enumerate(g)),
                 "object array": lambda e, g: np.array(g + [None], dtype=object)[:-1],
                 "tuples": lambda e, g: [(p.count, p.mean, p.m2) for p in g],
                 "empty": const([]), "None": const(None)})),
    BadClass("batch_norm_gather_stats partials: channel counts differ", ValueError,
             over([Slot("batch_norm_gather_stats partials", "partials[1]", "parts",
                        lambda e, v: gather(e, partials=v))], {
                 "4 channels": lambda e, g: [g[0], bn.Moments(2, np.zeros(4), np.ones(4))]})),
    BadClass("batch_norm_gather_stats: fewer than 2 values in all", ValueError,
             over([Slot("batch_norm_gather_stats partials", "more than 1 value", "parts",
                        lambda e, v: gather(e, partials=v))], {
                 "one value": lambda e, g: [bn.Moments(1, g[0].mean, g[0].m2 * 0)],
                 "no values": lambda e, g: [bn.Moments(0, g[0].mean, g[0].m2 * 0)] * 3})),
    BadClass("batch_norm_gather_stats partials: counts add up beyond int64", ValueError,
             over([Slot("batch_norm_gather_stats partials", "partials", "parts",
                        lambda e, v: gather(e, partials=v))], {
                 "3 x 2**62": lambda e, g: [bn.Moments(2**62, g[0].mean, g[0].m2)] * 3})),
    BadClass("Moments.merge: merged count beyond int64", ValueError, explicit(
        lambda e: Bad("Moments.merge other (merged count 2**63)", lambda e: bn.Moments(
            2**63 - 1, e["m"], e["m"]).merge(bn.Moments(1, e["m"], e["m"])), ("count",)))),
    BadClass("training call on a layer whose batch counter is full", ValueError, explicit(
        _bad("BatchNorm2d.__call__ with num_batches_tracked = 2**63 - 1", (COUNTER,),
             lambda e: e["layer"](e["x"]), lambda e: _full_counter(e["layer"])),
        _bad("SyncBatchNorm.__call__ with num_batches_tracked = 2**63 - 1", (COUNTER,),
             lambda e: e["sync"](e["x"]), lambda e: _full_counter(e["sync"])),
    )),
    # load_state_dict's counter -------------------------------------------------------
    BadClass("num_batches_tracked beyond int64 (after valid tensors)", ValueError,
             over([Slot("BatchNorm2d.load_state_dict num_batches_tracked", COUNTER, None,
                        lambda e, v: load(e, COUNTER, v))],
                  each([np.array(2**64 - 1, np.uint64), np.array(2**63, np.uint64)]))),
    BadClass("num_batches_tracked negative", ValueError,
             over([Slot("BatchNorm2d.load_state_dict num_batches_tracked", COUNTER, None,
                        lambda e, v: load(e, COUNTER, v))], each([np.array(-1)]))),
    BadClass("num_batches_tracked not an integer array", TypeError,
             over([Slot("BatchNorm2d.load_state_dict num_batches_tracked", COUNTER, None,
                        lambda e, v: load(e, COUNTER, v))],
                  each([5.0, "5", np.array(5.0), np.array(True), None]))),
]


def test_campaign_classes_have_unique_names_and_cases():
    assert len({c.name for c in CLASSES}) == len(CLASSES)
    env = _env()
    for klass in CLASSES:
        assert klass.bads(env), klass.name


@pytest.mark.parametrize("klass", CLASSES, ids=[c.name for c in CLASSES])
def test_campaign_every_bad_call_once(klass):
    env = _env()
    for bad in klass.bads(env):
        assert_rejected(env, bad.call, klass.error, bad.names)


@pytest.mark.parametrize("klass", CLASSES, ids=[c.name for c in CLASSES])
@given(data=st.data())
def test_campaign(klass, data):
    env = _env(data.draw(st.sampled_from([np.float16, np.float32, np.float64]), label="dtype"),
               data.draw(st.booleans(), label="channels_last"))
    bad = data.draw(st.sampled_from(klass.bads(env)), label="bad call")
    assert_rejected(env, bad.call, klass.error, bad.names)


PUBLIC = [name for name in bn.__all__ if name not in ("BackendUnavailableError", "get_backend")]
METHODS = ["__call__", "backward", "train", "to", "load_state_dict", "merge", "var"]


def test_campaign_reaches_every_public_callable_and_layer_method():
    env = _env()
    heads = {bad.label.split(" ")[0] for klass in CLASSES for bad in klass.bads(env)}
    callables = {re.split(r"[.(]", head)[0] for head in heads}
    methods = {head.rsplit(".", 1)[1] for head in heads if "." in head}
    assert not set(PUBLIC) - callables
    assert not set(METHODS) - methods


# ---------------------------------------------------------------------------- state after a rejected call
SYNC_BAD_INPUTS = {  # name: (input, residual) on rank 0, from the rank's good input
    "channels": lambda x, layer: (x[:, :2], None),
    "dtype": lambda x, layer: (x.astype(np.int32), None),
    "list": lambda x, layer: (x.tolist(), None),
    "1-D": lambda x, layer: (x.ravel(), None),
    "masked": lambda x, layer: (np.ma.masked_array(x), None),
    "residual shape": lambda x, layer: (x, x[:1]),
    "view of running_mean": lambda x, layer: (
        as_strided(layer.running_mean, (2, 3, 1), (0, layer.running_mean.strides[0], 0)), None),
}


def _sync_rank(comm, rank: int, bad: str, shape=(6, 3, 4)) -> str:
    """One rank of a 2-rank world: a good training call, a rejected one (bad input on rank 0
    only, or a local eval-mode call on both), then backward. Every layer attribute must be
    bitwise as after the good call, and the backward must equal that of a twin layer that never
    saw the rejected call."""
    rng = np.random.default_rng(rank)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    layer, twin = bn.SyncBatchNorm(3, comm=comm), bn.SyncBatchNorm(3, comm=comm)
    layer(x)
    twin(x)
    before = snapshot(vars(layer))
    if bad == "eval":  # a local (non-synchronised) call, rejected
        layer.eval()
        with pytest.raises(ValueError, match="num_features"):
            layer(x[:, :2])
        layer.train()
    else:
        arg, residual = SYNC_BAD_INPUTS[bad](x, layer) if rank == 0 else (x, None)
        with pytest.raises((TypeError, ValueError)) as info:
            layer(arg, residual=residual)
        if rank == 1:
            assert "rank(s) [0]" in str(info.value)
    assert snapshot(vars(layer)) == before
    np.testing.assert_array_equal(layer.backward(dy), twin.backward(dy))
    np.testing.assert_array_equal(layer.grad_weight, twin.grad_weight)
    return "ok"


@pytest.mark.parametrize("bad", [*SYNC_BAD_INPUTS, "eval"])
def test_rejected_sync_call_leaves_every_rank_as_it_was_and_backward_works(bad):
    results = ThreadWorld(2, timeout=10).run(lambda comm, rank: _sync_rank(comm, rank, bad))
    assert results == ["ok", "ok"], results


def test_rejected_call_keeps_the_last_forward_for_backward():
    layer = bn.BatchNorm2d(3, activation="relu")
    twin = bn.BatchNorm2d(3, activation="relu")
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2))
    z = np.ones_like(x)
    layer(x, residual=z)
    twin(x, residual=z)
    with pytest.raises(ValueError, match="residual"):
        layer(x * 2, residual=z[:1])
    np.testing.assert_array_equal(layer.backward(x), twin.backward(x))
    np.testing.assert_array_equal(layer.grad_residual, twin.grad_residual)


def test_load_state_dict_with_a_bad_counter_replaces_nothing():
    layer = bn.BatchNorm2d(3)
    state = {k: v + 1 for k, v in layer.state_dict().items()}
    before = snapshot(vars(layer))
    with pytest.raises(ValueError, match="num_batches_tracked"):
        layer.load_state_dict({**state, "num_batches_tracked": np.array(2**63, np.uint64)})
    assert snapshot(vars(layer)) == before
    layer.load_state_dict({**state, "num_batches_tracked": np.array(2**63 - 1, np.uint64)})
    assert int(layer.num_batches_tracked) == 2**63 - 1
    np.testing.assert_array_equal(to_numpy(layer.weight), 2)


# ---------------------------------------------------------------------------- no false alarms
def test_running_statistics_in_one_buffer_without_overlap_are_accepted():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 4))
    buf = np.zeros(6)
    rm, rv = buf[0::2], buf[1::2]  # interleaved: one buffer, no shared element
    rv[...] = 1.0
    ref_m, ref_v = np.zeros(3), np.ones(3)
    np.testing.assert_array_equal(bn.batch_norm(x, rm, rv, training=True),
                                  bn.batch_norm(x, ref_m, ref_v, training=True))
    np.testing.assert_array_equal(rm, ref_m)
    np.testing.assert_array_equal(rv, ref_v)
    both = np.zeros(x.size + 3)  # the input and a running statistic side by side
    xin, rm2 = both[3:].reshape(x.shape), both[:3]
    xin[...] = x
    bn.batch_norm(xin, rm2, np.ones(3), training=True)
    np.testing.assert_array_equal(rm2, ref_m)
    np.testing.assert_array_equal(xin, x)


def test_aliasing_that_writes_nothing_is_accepted():
    x = np.random.default_rng(1).standard_normal((5, 3))
    stats = np.full(3, 0.5)
    y = bn.batch_norm(x, stats, stats, training=False)  # eval reads the running stats only
    np.testing.assert_allclose(y, (x - 0.5) / np.sqrt(0.5 + 1e-5))
    weight = np.broadcast_to(np.float64(2.0), (3,))  # a read-only zero-stride parameter
    np.testing.assert_allclose(bn.batch_norm(x, None, None, weight, training=True),
                               2 * bn.batch_norm(x, None, None, training=True))


def test_moments_stores_count_as_an_int():
    m = bn.Moments(np.int64(4), np.zeros(2), np.ones(2))
    assert type(m.count) is int and m.count == 4
    assert m.merge(bn.Moments(np.uint8(4), np.ones(2), np.ones(2))).count == 8


class _DeviceLike:
    """Stands in for a CuPy array in the overlap check: its layout attributes (``data.ptr``,
    ``flags``, shape, strides, sizes) and the CUDA array interface, here describing host
    memory, which the check never reads."""

    def __init__(self, host: np.ndarray) -> None:
        self.size, self.shape, self.strides = host.size, host.shape, host.strides
        self.itemsize, self.nbytes, self.flags = host.itemsize, host.nbytes, host.flags
        self.data = types.SimpleNamespace(ptr=host.ctypes.data)
        interface = host.__array_interface__
        self.__cuda_array_interface__ = {"data": interface["data"], "shape": host.shape,
                                         "strides": interface["strides"],
                                         "typestr": interface["typestr"], "version": 3}


def test_overlap_check_reads_cupy_layouts_through_the_cuda_array_interface():
    from bncupy._validation import check_no_overlap

    buf = np.zeros(12, np.float32)
    x = _DeviceLike(buf[3:].reshape(3, 3))
    check_no_overlap({"running_mean": _DeviceLike(buf[:3])}, {"input": x})
    check_no_overlap({"running_mean": _DeviceLike(buf[0::4])},
                     {"running_var": _DeviceLike(buf[1::4])})
    with pytest.raises(ValueError, match="running_mean and input"):
        check_no_overlap({"running_mean": _DeviceLike(buf[1:4])}, {"input": x})
    with pytest.raises(ValueError, match="running_mean and running_var"):
        check_no_overlap({"running_mean": _DeviceLike(buf[0:8:4]),
                          "running_var": _DeviceLike(buf[4:12:4])}, {})

"""The CuPy backend's hot path, counted through the runtime seam of the CPU execution target.

* the launch and allocation budget of every op covered by it (both layouts, every dtype): no
  array operations, memsets or host synchronisations;
* the caller's stream: CuPy's current stream, and torch's for torch CUDA tensors;
* CUDA-graph capture and replay of a layer's forward and backward;
* a failure at every allocation and every launch loses nothing;
* optional pointers reach the kernels as explicit null pointers, never None;
* the CPU target's module functions keep views as views.

These need tests/emulated's seam (tox env ``emulated``); elsewhere they are skipped.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import bncupy as bn
from bncupy.backends import cupy as cupy_backend
from tests.arrays import to_numpy
from tests.conftest import EMULATED

pytestmark = pytest.mark.skipif(not EMULATED, reason="counts through the CPU execution "
                                                     "target's seam (tox -e emulated)")

DTYPES = ["float16", "bfloat16", "float32", "float64"]


@pytest.fixture
def dev():
    """The emulated device module, its seam reset and faults disarmed around each test."""
    from tests.emulated import device

    device.SEAM.reset()
    device.FAULTS.disarm()
    yield device
    device.FAULTS.disarm()


def _acc(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


def _data(xp: Any, shape: tuple[int, ...], dtype: str, seed: int = 0, offset: float = 2.0) -> Any:
    rng = np.random.default_rng(seed)
    return xp.asarray((rng.standard_normal(shape) + offset).astype(dtype))


class Case:
    """One op under the budget: ``run(xp)`` calls it (arrays made once, outside the count);
    ``ops`` names the array operations it is allowed (none but documented conversions)."""

    def __init__(self, name: str, launches: int, allocations: int,
                 make: Callable[[Any], Callable[[], Any]], ops: tuple[str, ...] = ()) -> None:
        self.name, self.launches, self.allocations, self.make = name, launches, allocations, make
        self.ops = ops


def _batch_cases(dtype: str, layout: str) -> list[Case]:
    shape, axis = ((4, 6, 5, 8), 1) if layout == "NCHW" else ((4, 5, 8, 6), -1)
    acc = _acc(dtype)

    def arrays(xp: Any) -> dict[str, Any]:
        a = {k: _data(xp, shape, dtype, i) for i, k in enumerate(("x", "dy", "z"))}
        a.update(rm=xp.zeros(6, acc), rv=xp.ones(6, acc), w=_data(xp, (6,), acc, 5),
                 b=_data(xp, (6,), acc, 6))
        _, a["m"], a["s"] = bn.batch_norm_forward(a["x"], None, None, a["w"], a["b"], True,
                                                  axis=axis)
        return a

    def train(xp: Any, **fused: Any) -> Callable[[], Any]:
        a = arrays(xp)
        extra = {k: a["z"] if v == "z" else v for k, v in fused.items()}
        return lambda: bn.batch_norm(a["x"], a["rm"], a["rv"], a["w"], a["b"], True, axis=axis,
                                     **extra)

    def evaluate(xp: Any, **fused: Any) -> Callable[[], Any]:
        a = arrays(xp)
        extra = {k: a["z"] if v == "z" else v for k, v in fused.items()}
        return lambda: bn.batch_norm(a["x"], a["rm"], a["rv"], a["w"], a["b"], False,
                                     axis=axis, **extra)

    def backward(xp: Any) -> Callable[[], Any]:
        a = arrays(xp)
        return lambda: bn.batch_norm_backward(a["dy"], a["x"], a["w"], a["m"], a["s"],
                                              axis=axis)

    def layer(xp: Any, fused: bool = False) -> Callable[[], Any]:
        a = arrays(xp)
        m = bn.BatchNorm2d(6, channels_last=axis == -1, activation="relu" if fused else None,
                           dtype=acc)
        z = a["z"] if fused else None
        return lambda: (m(a["x"], residual=z), m.backward(a["dy"]))

    return [
        Case(f"batch_norm train {layout} {dtype}", 2, 2, train),
        Case(f"batch_norm train relu+residual {layout} {dtype}", 2, 2,
             lambda xp: train(xp, activation="relu", residual="z")),
        Case(f"batch_norm eval {layout} {dtype}", 1, 2, evaluate),
        Case(f"batch_norm eval relu+residual {layout} {dtype}", 1, 2,
             lambda xp: evaluate(xp, activation="relu", residual="z")),
        Case(f"batch_norm_backward {layout} {dtype}", 2, 3, backward),  # dx, dweight, dbias
        Case(f"BatchNorm2d step {layout} {dtype}", 4, 5, layer),
        # the fused residual's gradient is one more output
        Case(f"BatchNorm2d relu+residual step {layout} {dtype}", 4, 6,
             lambda xp: layer(xp, fused=True)),
    ]


def _family_cases(dtype: str, layout: str, n: int) -> list[Case]:
    axis = 1 if layout == "NCHW" else -1
    acc = _acc(dtype)
    cf = layout == "NCHW"
    group_launches = (1, 3) if cf else (3, 3)  # (forward, backward)

    def group(xp: Any, shape: tuple[int, ...], groups: int, backward: bool,
              instance: bool = False) -> Callable[[], Any]:
        dims = shape if cf else (shape[0], *shape[2:], shape[1])
        x, dy = _data(xp, dims, dtype, 1), _data(xp, dims, dtype, 2)
        c = shape[1]
        w, b = _data(xp, (c,), acc, 3), _data(xp, (c,), acc, 4)
        if instance:
            _, m, s = bn.instance_norm_forward(x, None, None, w, b, axis=axis)
            if backward:
                return lambda: bn.instance_norm_backward(dy, x, m, s, w, axis=axis)
            return lambda: bn.instance_norm(x, None, None, w, b, axis=axis)
        _, m, s = bn.group_norm_forward(x, groups, w, b, axis=axis)
        if backward:
            return lambda: bn.group_norm_backward(dy, x, groups, m, s, w, axis=axis)
        return lambda: bn.group_norm(x, groups, w, b, axis=axis)

    def layer_norm(xp: Any, backward: bool) -> Callable[[], Any]:
        x, dy = _data(xp, (n, 7, 40), dtype, 1), _data(xp, (n, 7, 40), dtype, 2)
        w, b = _data(xp, (40,), acc, 3), _data(xp, (40,), acc, 4)
        _, m, s = bn.layer_norm_forward(x, 40, w, b)
        if backward:
            return lambda: bn.layer_norm_backward(dy, x, 40, m, s, w)
        return lambda: bn.layer_norm(x, 40, w, b)

    def rms_norm(xp: Any, backward: bool, stream: str | None) -> Callable[[], Any]:
        """RMSNorm; with ``stream`` (a dtype) the fused residual add, prenorm."""
        x, dy = _data(xp, (n, 7, 40), dtype, 1), _data(xp, (n, 7, 40), dtype, 2)
        w = _data(xp, (40,), acc, 3)
        r = None if stream is None else _data(xp, (n, 7, 40), stream, 4)
        y, s, *h = bn.rms_norm_forward(x, 40, w, residual=r)
        if backward:
            g = None if stream is None else h[0]
            return lambda: bn.rms_norm_backward(dy, h[0] if h else x, 40, s, w, grad_prenorm=g)
        return lambda: bn.rms_norm(x, 40, w, residual=r, prenorm=stream is not None)

    def layers(xp: Any) -> Callable[[], Any]:
        x = _data(xp, (n, 8, 6, 5) if cf else (n, 6, 5, 8), dtype, 1)
        gn = bn.GroupNorm(4, 8, dtype=acc, channels_last=not cf)
        return lambda: (gn(x), gn.backward(x))

    tag = f"{layout} {dtype} N={n}"
    cases = [
        Case(f"group_norm {tag}", group_launches[0], 2,
             lambda xp: group(xp, (n, 8, 6, 5), 4, False)),
        Case(f"group_norm_backward {tag}", group_launches[1], 3,
             lambda xp: group(xp, (n, 8, 6, 5), 4, True)),
        Case(f"instance_norm {tag}", group_launches[0], 2,
             lambda xp: group(xp, (n, 8, 6, 5), 8, False, instance=True)),
        Case(f"instance_norm_backward {tag}", group_launches[1], 3,
             lambda xp: group(xp, (n, 8, 6, 5), 8, True, instance=True)),
        Case(f"GroupNorm step {tag}", sum(group_launches), 5, layers),
    ]
    if cf:  # groups longer than one block's share: split statistics, then apply
        cases.append(Case(f"group_norm long groups {tag}", 2, 2,
                          lambda xp: group(xp, (n, 4, 40000), 2, False)))
        cases += [Case(f"layer_norm {tag}", 1, 2, lambda xp: layer_norm(xp, False)),
                  Case(f"layer_norm_backward {tag}", 2, 3, lambda xp: layer_norm(xp, True)),
                  Case(f"rms_norm {tag}", 1, 2, lambda xp: rms_norm(xp, False, None)),
                  Case(f"rms_norm_backward {tag}", 2, 2, lambda xp: rms_norm(xp, True, None))]
        for stream in {dtype, "float32"} if dtype in ("float16", "bfloat16") else {dtype}:
            cases += [  # y and h
                Case(f"rms_norm residual {stream} prenorm {tag}", 1, 3,
                     lambda xp, st=stream: rms_norm(xp, False, st)),
                # a float32 stream's backward takes 16-bit dy converted (README: transformer
                # norms)
                Case(f"rms_norm_backward grad_prenorm {stream} {tag}", 2, 2,
                     lambda xp, st=stream: rms_norm(xp, True, st),
                     ("cupy.ascontiguousarray",) if stream != dtype else ())]
    return cases


CASES = [c for dtype in DTYPES for layout in ("NCHW", "NHWC")
         for c in _batch_cases(dtype, layout)
         + [f for n in (1, 8) for f in _family_cases(dtype, layout, n)]]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_launch_and_allocation_budget(dev, case):
    """After a first call (which compiles and sizes the stream's workspace), a call makes its
    budgeted launches, allocates at most its outputs, and runs no array operation, memset or
    host synchronisation."""
    with bn.use_backend("cupy"):
        run = case.make(dev)
        run()
        dev.SEAM.reset()
        run()
    seam = dev.SEAM
    assert (seam.launches, seam.memsets, seam.syncs) == (case.launches, 0, 0), seam.op_names
    assert tuple(seam.op_names) == case.ops
    assert seam.allocations <= case.allocations + len(case.ops)


def _layer_steps(dev: Any) -> list[tuple[str, Any, Any, Any, Any]]:
    """(name, layer, x, another x, dy)."""
    steps = []
    for channels_last in (False, True):
        shape = (4, 5, 7, 6) if channels_last else (4, 6, 5, 7)
        x, x2, dy = (_data(dev, shape, "float32", s) for s in range(3))
        for name, layer in (("BatchNorm2d", bn.BatchNorm2d(6, channels_last=channels_last)),
                            ("GroupNorm", bn.GroupNorm(3, 6, channels_last=channels_last)),
                            ("InstanceNorm2d", bn.InstanceNorm2d(
                                6, affine=True, channels_last=channels_last))):
            steps.append((f"{name}{' NHWC' if channels_last else ''}", layer, x, x2, dy))
    x, x2, dy = (_data(dev, (8, 40), "float32", s) for s in range(3))
    steps += [("LayerNorm", bn.LayerNorm(40), x, x2, dy), ("RMSNorm", bn.RMSNorm(40), x, x2, dy)]
    return steps


def test_a_layer_step_allocates_only_its_outputs(dev):
    """From the second step on, a layer's forward writes its statistics into buffers of its own
    (no allocation, no views of them made): a step allocates y, dx and one array per parameter
    gradient (RMSNorm: the weight's alone), no views of a shared buffer."""
    with bn.use_backend("cupy"):
        for name, layer, x, _, dy in _layer_steps(dev):
            for _ in range(3):
                layer(x)
                layer.backward(dy)
            dev.SEAM.reset()
            layer(x)
            layer.backward(dy)
            assert dev.SEAM.allocations == (3 if name == "RMSNorm" else 4), name


def test_a_failed_layer_forward_keeps_the_last_forwards_statistics(dev):
    """A forward that fails at any launch or allocation must not write the statistics the
    layer's last forward left for its backward pass: the backward after it gives what it gives
    without the failed call (the layer's two buffers are taken in turn, never the saved one)."""
    checked = 0
    with bn.use_backend("cupy"):
        for name, layer, x, x2, dy in _layer_steps(dev):
            layer(x2)
            layer(x)
            expected = [to_numpy(a).copy() for a in (layer.backward(dy), layer.grad_weight)]
            dev.SEAM.reset()
            layer(x2)
            counts = {"allocation": dev.SEAM.allocations, "launch": dev.SEAM.launches}
            layer(x)
            for kind, total in counts.items():
                for k in range(1, total + 1):
                    dev.FAULTS.arm(kind, k)
                    with pytest.raises((dev.OutOfMemoryError, dev.CUDADriverError)):
                        layer(x2)
                    dev.FAULTS.disarm()
                    got = [layer.backward(dy), layer.grad_weight]
                    for g, want in zip(got, expected, strict=True):
                        np.testing.assert_array_equal(to_numpy(g), want,
                                                      err_msg=f"{name}: {kind} {k}")
                    checked += 1
    assert checked > 20


def test_a_layer_keeps_statistics_buffers_for_its_last_width_only(dev):
    """LayerNorm's statistics are as wide as the batch has rows: a layer called with a new row
    count each time keeps the pair of the last one and the buffer its backward pass needs."""
    from bncupy.backends.cupy import _ROWS, StatBuffers

    with bn.use_backend("cupy"):
        layer = bn.LayerNorm(40)
        before = len(_ROWS)
        for rows in range(2, 12):
            layer(_data(dev, (rows, 40), "float32", rows))
            held = [buf for pair in StatBuffers.of(layer).pairs.values() for buf in pair]
            assert len(held) <= 2 and len(_ROWS) <= before + 2
        dy = _data(dev, (11, 40), "float32", 0)
        x = _data(dev, (11, 40), "float32", 11)
        fresh = bn.LayerNorm(40)
        fresh(x)
        np.testing.assert_array_equal(to_numpy(layer.backward(dy)),
                                      to_numpy(fresh.backward(dy)))
        del layer, fresh
        assert len(_ROWS) == before


def test_a_copied_layer_has_statistics_buffers_of_its_own(dev):
    """A shallow copy of a layer shares its parameters (as ``copy.copy`` does) but not its
    statistics buffers: interleaved steps of three copies give each its own gradients."""
    import copy

    with bn.use_backend("cupy"):
        layer = bn.BatchNorm2d(6)
        xs = [_data(dev, (4, 6, 5, 7), "float32", s) for s in range(3)]
        dy = _data(dev, (4, 6, 5, 7), "float32", 9)
        layer(xs[0])  # its buffers exist when it is copied
        layers = [layer, copy.copy(layer), copy.copy(layer)]
        for one, x in zip(layers, xs, strict=True):
            one(x)
        got = [to_numpy(one.backward(dy)) for one in layers]
        for x, g in zip(xs, got, strict=True):
            fresh = bn.BatchNorm2d(6)
            fresh(x)
            np.testing.assert_array_equal(g, to_numpy(fresh.backward(dy)))


# ------------------------------------------------------------------------------ streams

def test_kernels_launch_on_cupys_current_stream(dev):
    x = _data(dev, (4, 6, 5, 5), "float32")
    layer = bn.BatchNorm2d(6)
    layer(x)  # the default stream's workspace
    stream = dev.cuda.Stream(non_blocking=True)
    dev.SEAM.reset()
    with stream:
        layer.backward(layer(x))
        bn.layer_norm(x, 5)
        bn.group_norm(x, 3, axis=1)
    assert dev.SEAM.streams and set(dev.SEAM.streams) == {stream.ptr}


class _FakeTorch:
    """A stand-in for torch's CUDA tensors: device memory exported through the CUDA array
    interface and DLPack's device query, of a module named ``torch`` whose
    ``cuda.current_stream()`` is not CuPy's."""

    STREAM = 0xABC0

    def __init__(self) -> None:
        module = types.ModuleType("torch")
        tensor = type("Tensor", (), {
            "__module__": "torch",
            "__init__": lambda self, a: setattr(self, "array", a),
            "__dlpack_device__": lambda self: (2, 0),  # kDLCUDA, device 0
            "__cuda_array_interface__": property(
                lambda self: self.array.__cuda_array_interface__),
        })
        stream = types.SimpleNamespace(cuda_stream=self.STREAM)
        module.Tensor = tensor
        module.cuda = types.SimpleNamespace(current_stream=lambda device=None: stream)
        module.from_dlpack = tensor
        self.module, self.Tensor = module, tensor


def test_torch_cuda_tensors_run_on_torchs_current_stream(dev, monkeypatch):
    torch = _FakeTorch()
    monkeypatch.setitem(sys.modules, "torch", torch.module)
    x = _data(dev, (4, 6, 5, 5), "float32")
    rm, rv = dev.zeros(6, "float32"), dev.ones(6, "float32")
    t = torch.Tensor(x)
    dev.SEAM.reset()
    y = bn.batch_norm(t, torch.Tensor(rm), torch.Tensor(rv), training=True)
    layer = bn.BatchNorm2d(6)
    out = layer(t)
    dx = layer.backward(torch.Tensor(_data(dev, (4, 6, 5, 5), "float32", 3)))
    assert isinstance(y, torch.Tensor) and isinstance(out, torch.Tensor)
    assert isinstance(dx, torch.Tensor)
    assert dev.SEAM.streams and set(dev.SEAM.streams) == {_FakeTorch.STREAM}
    ref = bn.batch_norm(to_numpy(x), None, None, training=True)
    np.testing.assert_allclose(to_numpy(y.array), ref, atol=1e-5)
    np.testing.assert_allclose(to_numpy(rm), 0.1 * to_numpy(x).mean(axis=(0, 2, 3)),
                               rtol=1e-5)  # running statistics updated in the caller's memory


# ------------------------------------------------------------------------------ CUDA graphs

def _graph_layer(channels_last: bool, fused: bool) -> tuple[Any, Any]:
    kwargs = {"channels_last": channels_last, "activation": "relu" if fused else None}
    return bn.BatchNorm2d(6, momentum=0.3, **kwargs), bn.BatchNorm2d(6, momentum=0.3, **kwargs)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_a_layer_step_captured_in_a_graph_replays_like_eager_calls(dev, channels_last, fused):
    """Forward + backward captured once and replayed with new data copied into the captured
    inputs: outputs, gradients and running statistics equal those of eager calls."""
    shape = (4, 5, 7, 6) if channels_last else (4, 6, 5, 7)
    batches = [_data(dev, shape, "float32", seed) for seed in range(4)]
    grads = [_data(dev, shape, "float32", 10 + seed) for seed in range(4)]
    residual = _data(dev, shape, "float32", 99) if fused else None
    captured, eager = _graph_layer(channels_last, fused)
    x, dy = dev.empty(shape, "float32"), dev.empty(shape, "float32")
    x[...], dy[...] = batches[0], grads[0]
    stream = dev.cuda.Stream(non_blocking=True)
    with stream:
        captured.backward(captured(x, residual=residual))  # warm-up: workspace, kernels
        eager.backward(eager(batches[0], residual=residual))
        stream.begin_capture()
        y = captured(x, residual=residual)
        dx = captured.backward(dy)
        graph = stream.end_capture()
    for step in range(1, 4):
        x[...], dy[...] = batches[step], grads[step]
        graph.launch()
        ey = eager(batches[step], residual=residual)
        edx = eager.backward(grads[step])
        for got, want in ((y, ey), (dx, edx), (captured.grad_weight, eager.grad_weight),
                          (captured.grad_bias, eager.grad_bias),
                          (captured.running_mean, eager.running_mean),
                          (captured.running_var, eager.running_var)):
            np.testing.assert_array_equal(to_numpy(got), to_numpy(want))
    # a host counter: the warm-up and the captured call, not the replays
    assert int(captured.num_batches_tracked) == 2 and int(eager.num_batches_tracked) == 4


def test_family_ops_capture_and_replay(dev):
    x = _data(dev, (4, 8, 5, 6), "float32")
    xl = _data(dev, (6, 40), "float32")
    rl = _data(dev, (6, 40), "float32", 1)

    def ops() -> dict:
        return {"gn": bn.group_norm(x, 4), "ln": bn.layer_norm(xl, 40),
                "gn_cl": bn.group_norm(x, 2, axis=-1),
                "rms+residual": bn.rms_norm(xl, 40, residual=rl, prenorm=True)}

    ref = ops()
    stream = dev.cuda.Stream(non_blocking=True)
    with stream:
        for _ in range(2):  # warm-up, then capture
            if _:
                stream.begin_capture()
            out = ops()
        graph = stream.end_capture()
    graph.launch()
    for key, value in out.items():  # every captured output alive: the graph writes them
        for got, want in zip(value if isinstance(value, tuple) else (value,),
                             ref[key] if isinstance(ref[key], tuple) else (ref[key],),
                             strict=True):
            np.testing.assert_array_equal(to_numpy(got), to_numpy(want))


def test_capture_refuses_host_state_that_a_replay_would_repeat(dev):
    layer = bn.BatchNorm2d(6, momentum=None)
    x = _data(dev, (4, 6, 5, 5), "float32")
    stream = dev.cuda.Stream(non_blocking=True)
    with stream:
        layer(x)
        stream.begin_capture()
        with pytest.raises(RuntimeError, match="momentum=None.*CUDA graph"):
            layer(x)
        stream.end_capture()
    assert int(layer.num_batches_tracked) == 1


def test_the_cpu_target_refuses_what_a_capture_cannot_hold(dev):
    """The model's capture rules: no host synchronisation while capturing, and no replay over
    memory freed since the capture."""
    x = _data(dev, (4, 6, 5, 5), "float32")
    stream = dev.cuda.Stream(non_blocking=True)
    with stream:
        bn.batch_norm(x, None, None, training=True)
        stream.begin_capture()
        with pytest.raises(dev.CaptureError, match="synchronisation"):
            x.get()
        y = bn.batch_norm(x, None, None, training=True)
        graph = stream.end_capture()
    del y  # the captured output is freed: a replay would write memory given to others
    with pytest.raises(dev.CaptureError, match="freed after the capture"):
        graph.launch()


# ------------------------------------------------------------------------------ faults

def _state(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: to_numpy(v).copy() for k, v in arrays.items() if v is not None}


def _fault_cases(dev: Any) -> list[tuple[str, Callable[[], Any], Callable[[], dict]]]:
    """(name, call, state): every op, and the state a failed call must leave as it was."""
    cases = []
    for layout, shape, axis in (("NCHW", (4, 6, 5, 8), 1), ("NHWC", (4, 5, 8, 6), -1)):
        x, dy, z = (_data(dev, shape, "float32", s) for s in range(3))
        rm, rv = dev.zeros(6, "float32"), dev.ones(6, "float32")
        w, b = _data(dev, (6,), "float32", 4), _data(dev, (6,), "float32", 5)
        _, m, s = bn.batch_norm_forward(x, None, None, w, b, True, axis=axis)
        layer = bn.BatchNorm2d(6, channels_last=axis == -1, activation="relu")
        layer(x, residual=z)

        def layer_state(layer: Any = layer) -> dict:
            return {**_state(layer.state_dict()), **_state(
                {"gw": layer.grad_weight, "gb": layer.grad_bias, "gr": layer.grad_residual})}

        ax = axis
        cases += [
            (f"batch_norm train {layout}",
             lambda x=x, rm=rm, rv=rv, w=w, b=b, ax=ax: bn.batch_norm(x, rm, rv, w, b, True,
                                                                      axis=ax),
             lambda rm=rm, rv=rv: _state({"rm": rm, "rv": rv})),
            (f"batch_norm eval {layout}",
             lambda x=x, rm=rm, rv=rv, ax=ax: bn.batch_norm(x, rm, rv, None, None, False,
                                                            axis=ax),
             lambda rm=rm, rv=rv: _state({"rm": rm, "rv": rv})),
            (f"batch_norm_backward {layout}",
             lambda dy=dy, x=x, w=w, m=m, s=s, ax=ax: bn.batch_norm_backward(dy, x, w, m, s,
                                                                             axis=ax),
             dict),
            (f"BatchNorm2d relu+residual forward {layout}",
             lambda layer=layer, x=x, z=z: layer(x, residual=z), layer_state),
            (f"BatchNorm2d relu+residual backward {layout}",
             lambda layer=layer, dy=dy: layer.backward(dy), layer_state),
            (f"group_norm {layout}", lambda x=x, ax=ax: bn.group_norm(x, 3, axis=ax), dict),
            (f"instance_norm with running statistics {layout}",
             lambda x=x, rm=rm, rv=rv, ax=ax: bn.instance_norm(x, rm, rv, axis=ax),
             lambda rm=rm, rv=rv: _state({"rm": rm, "rv": rv})),
            (f"group_norm_backward {layout}",
             lambda x=x, dy=dy, ax=ax: bn.group_norm_backward(
                 dy, x, 3, *bn.group_norm_forward(x, 3, axis=ax)[1:], axis=ax), dict),
        ]
    xl, dyl = _data(dev, (6, 40), "float32"), _data(dev, (6, 40), "float32", 1)
    _, lm, ls = bn.layer_norm_forward(xl, 40)
    rl = _data(dev, (6, 40), "float32", 2)
    _, rs, rh = bn.rms_norm_forward(xl, 40, residual=rl)
    cases += [("layer_norm", lambda: bn.layer_norm(xl, 40), dict),
              ("layer_norm_backward", lambda: bn.layer_norm_backward(dyl, xl, 40, lm, ls), dict),
              ("rms_norm residual prenorm",
               lambda: bn.rms_norm(xl, 40, residual=rl, prenorm=True), dict),
              ("rms_norm_backward grad_prenorm",
               lambda: bn.rms_norm_backward(dyl, rh, 40, rs, grad_prenorm=rl), dict)]
    return cases


def _arrays(result: Any) -> list[Any]:
    """The arrays in a result (an array or nested tuples of them and None)."""
    if isinstance(result, tuple):
        return [a for item in result for a in _arrays(item)]
    return [] if result is None else [result]


def test_a_failure_at_any_allocation_or_launch_loses_nothing(dev):
    """Every op fails at its k-th allocation and at its k-th launch, for every k: the error
    reaches the caller, the caller's state is as it was, and the next call on the stream (whose
    arrival counters the failed call used) gives what an undisturbed call gives."""
    checked = 0
    for name, call, state in _fault_cases(dev):
        call()  # the stream's workspace exists: faults hit the op's own allocations
        dev.SEAM.reset()
        expected = call()
        counts = {"allocation": dev.SEAM.allocations, "launch": dev.SEAM.launches}
        for kind, total in counts.items():
            for k in range(1, total + 1):
                restore = state()
                dev.FAULTS.arm(kind, k)
                with pytest.raises((dev.OutOfMemoryError, dev.CUDADriverError)):
                    call()
                dev.FAULTS.disarm()
                after = state()
                assert after.keys() == restore.keys()
                for key in after:
                    np.testing.assert_array_equal(after[key], restore[key],
                                                  err_msg=f"{name}: {kind} {k}: {key}")
                checked += 1
        again = call()
        for got, want in zip(_arrays(again), _arrays(expected), strict=True):
            np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=1e-5, atol=1e-5,
                                       err_msg=name)
    assert checked > 40


# ------------------------------------------------------------------------------ null pointers

def test_optional_arguments_reach_the_kernels_as_null_pointers(dev):
    """The CPU target refuses None as a kernel argument (CuPy 13 passes it as a garbage
    address); every op with every optional argument left out runs."""
    from tests.emulated import KernelFault

    kernel = cupy_backend.runtime().kernel("float32", cupy_backend.name_expressions(
        ("float32",))[0])
    with pytest.raises(KernelFault, match="None"):
        kernel((1,), (256,), tuple([None] * len(kernel.signature)))
    x = _data(dev, (4, 6, 5, 5), "float32")
    y, m, s = bn.batch_norm_forward(x, None, None, None, None, True)
    bn.batch_norm_backward(x, x, None, m, s)
    y, m, s = bn.group_norm_forward(x, 3)
    bn.group_norm_backward(x, x, 3, m, s)
    y, m, s = bn.layer_norm_forward(x, (5, 5))
    bn.layer_norm_backward(x, x, (5, 5), m, s)
    np.testing.assert_allclose(to_numpy(y), bn.layer_norm(to_numpy(x), (5, 5)), atol=1e-5)


# ------------------------------------------------------------------------------ views

@pytest.mark.parametrize("fn", [
    lambda xp, a: xp.moveaxis(a, 1, -1), lambda xp, a: xp.transpose(a, (0, 2, 3, 1)),
    lambda xp, a: xp.broadcast_to(a[:1], a.shape), lambda xp, a: xp.expand_dims(a, 0),
    lambda xp, a: xp.reshape(a, (-1,)), lambda xp, a: a.reshape(2, -1), lambda xp, a: a[:, ::2],
], ids=["moveaxis", "transpose", "broadcast_to", "expand_dims", "reshape", "ndarray.reshape",
        "slice"])
def test_module_functions_keep_views_as_views(dev, fn):
    a = dev.zeros((2, 3, 4, 5), "float32")
    dev.SEAM.reset()
    view = fn(dev, a)
    assert (dev.SEAM.allocations, dev.SEAM.ops) == (0, 0)
    a[...] = 7.0
    assert (to_numpy(view) == 7.0).all()


# ------------------------------------------------------------------------------ traffic

def _traffic_cases(dev: Any, dtype: str, layout: str) -> list[tuple[str, Callable, dict]]:
    """(name, call, {array: (reads, writes)}): the tensors' traffic model of each op, in units
    of the tensor's size (design notes, section 4); per-channel vectors and partials are not
    counted."""
    shape, axis = ((8, 16, 24, 20), 1) if layout == "NCHW" else ((8, 24, 20, 16), -1)
    c = 16
    x, dy, z = (_data(dev, shape, dtype, s) for s in range(3))
    w, b = _data(dev, (c,), _acc(dtype), 3), _data(dev, (c,), _acc(dtype), 4)
    rm, rv = dev.zeros(c, _acc(dtype)), dev.ones(c, _acc(dtype))
    _, m, s = bn.batch_norm_forward(x, None, None, w, b, True, axis=axis)
    out: dict[str, Any] = {}

    def keep(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            out[name] = fn()
            return out[name]
        return run

    layer = bn.BatchNorm2d(c, channels_last=axis == -1, activation="relu", dtype=_acc(dtype))
    layer(x, residual=z)
    gn_x = x
    _, gm, gs = bn.group_norm_forward(gn_x, 4, w, b, axis=axis)
    rows = _data(dev, (64, 1024), dtype, 5)
    rows_dy = _data(dev, (64, 1024), dtype, 6)
    lw = _data(dev, (1024,), _acc(dtype), 7)
    _, lm, ls = bn.layer_norm_forward(rows, 1024, lw, lw)
    resid = _data(dev, (64, 1024), dtype, 8)
    _, rs, rh = bn.rms_norm_forward(rows, 1024, lw, residual=resid)

    def keep_pair(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            out["y"], out["h"] = fn()
            return out["y"]
        return run

    return [
        ("batch_norm train", keep("y", lambda: bn.batch_norm(x, rm, rv, w, b, True, axis=axis)),
         {"x": (x, 2, 0), "y": ("y", 0, 1)}),
        ("batch_norm train relu+residual", keep("y", lambda: bn.batch_norm(
            x, rm, rv, w, b, True, axis=axis, activation="relu", residual=z)),
         {"x": (x, 2, 0), "z": (z, 1, 0), "y": ("y", 0, 1)}),
        ("batch_norm eval", keep("y", lambda: bn.batch_norm(x, rm, rv, w, b, False, axis=axis)),
         {"x": (x, 1, 0), "y": ("y", 0, 1)}),
        ("batch_norm_backward", keep("dx", lambda: bn.batch_norm_backward(dy, x, w, m, s,
                                                                          axis=axis)[0]),
         {"x": (x, 2, 0), "dy": (dy, 2, 0), "dx": ("dx", 0, 1)}),
        ("BatchNorm2d relu+residual backward", keep("dx", lambda: layer.backward(dy)),
         {"x": (x, 2, 0), "dy": (dy, 2, 0), "z": (z, 2, 0), "dx": ("dx", 0, 1)}),
        ("group_norm", keep("y", lambda: bn.group_norm(gn_x, 4, w, b, axis=axis)),
         {"x": (gn_x, 2, 0), "y": ("y", 0, 1)}),
        ("group_norm_backward", keep("dx", lambda: bn.group_norm_backward(
            dy, gn_x, 4, gm, gs, w, axis=axis)[0]),
         {"x": (gn_x, 2, 0), "dy": (dy, 2, 0), "dx": ("dx", 0, 1)}),
        ("layer_norm", keep("y", lambda: bn.layer_norm(rows, 1024, lw, lw)),
         {"x": (rows, 1, 0), "y": ("y", 0, 1)}),
        ("layer_norm_backward", keep("dx", lambda: bn.layer_norm_backward(
            rows_dy, rows, 1024, lm, ls, lw)[0]),
         {"x": (rows, 1, 0), "dy": (rows_dy, 1, 0), "dx": ("dx", 0, 1)}),
        ("rms_norm", keep("y", lambda: bn.rms_norm(rows, 1024, lw)),
         {"x": (rows, 1, 0), "y": ("y", 0, 1)}),
        ("rms_norm residual prenorm", keep_pair(lambda: bn.rms_norm(
            rows, 1024, lw, residual=resid, prenorm=True)),
         {"x": (rows, 1, 0), "residual": (resid, 1, 0), "y": ("y", 0, 1), "h": ("h", 0, 1)}),
        ("layer_norm residual", keep("y", lambda: bn.layer_norm(rows, 1024, lw, lw,
                                                                residual=resid)),
         {"x": (rows, 1, 0), "residual": (resid, 1, 0), "y": ("y", 0, 1)}),
        ("rms_norm_backward grad_prenorm", keep("dx", lambda: bn.rms_norm_backward(
            rows_dy, rh, 1024, rs, lw, grad_prenorm=resid)[0]),
         {"h": (rh, 1, 0), "dy": (rows_dy, 1, 0), "grad_prenorm": (resid, 1, 0),
          "dx": ("dx", 0, 1)}),
    ], out


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_each_op_moves_the_bytes_of_its_traffic_model(dev, dtype, layout):
    """Bytes each launch read from and wrote to the op's tensors, counted by the CPU target at
    every load and store, against the op's traffic model (a read of a tensor is its size): a
    second pass over a tensor that the model does not allow fails here."""
    cases, out = _traffic_cases(dev, dtype, layout)
    for name, call, model in cases:
        call()  # the workspace of the stream exists
        dev.SEAM.reset()
        call()
        for label, (array, reads, writes) in model.items():
            array = out[array] if isinstance(array, str) else array
            read, written = dev.SEAM.bytes(array)
            nbytes = array.nbytes
            # a pilot value per channel (or row) is read besides the passes
            assert read <= reads * nbytes + nbytes // 64, (name, label, read / nbytes)
            assert written == writes * nbytes, (name, label, written / nbytes)


@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_takes_1_over_sqrt_once_per_block_and_channel(dev, dtype, layout, lag, monkeypatch):
    """Evaluation computes each channel's coefficients once per block (1/sqrt counted by the CPU
    target: C per block, and C for the statistics it stores), not per value, and its output is
    bit for bit the per-value computation's (which more channels than the table holds take),
    with and without the fused residual and ReLU, on and off a 16-byte boundary."""
    shape, axis = ((8, 16, 24, 20), 1) if layout == "NCHW" else ((8, 24, 20, 16), 3)
    c, size = 16, int(np.prod(shape))
    acc = _acc(dtype)
    x, z = (_data(dev, (size + lag,), dtype, s)[lag:].reshape(shape) for s in (0, 1))
    w, b, rm = (_data(dev, (c,), acc, s, 0.0) for s in (2, 3, 4))
    rv = dev.asarray(np.random.default_rng(5).uniform(0.5, 2.0, c).astype(acc))

    def run(residual: Any, relu: bool) -> tuple[np.ndarray, int]:
        dev.SEAM.reset()
        y = cupy_backend.normalize_eval(x, axis, rm, rv, w, b, 1e-5, residual, relu)[0]
        (kernel, rsqrts), = dev.SEAM.rsqrts
        assert "apply<" in kernel
        return y.get(), rsqrts

    def fresh_geometries() -> None:
        cupy_backend._GEOMETRIES.clear()
        cupy_backend._geometry_cached.cache_clear()

    fresh_geometries()
    blocks = cupy_backend._geometry(x, axis).eval_blocks
    fused = [(None, False), (z, True)]
    once = [run(*f) for f in fused]
    monkeypatch.setattr(cupy_backend, "_EVAL_TABLE", 0)  # the per-value path
    fresh_geometries()
    for (residual, relu), (y, rsqrts) in zip(fused, once, strict=True):
        assert rsqrts == c * (blocks + 1) < size // 16
        y_each, rsqrts_each = run(residual, relu)
        assert rsqrts_each == size + c
        np.testing.assert_array_equal(y.view(np.uint8), y_each.view(np.uint8))
    fresh_geometries()


@pytest.mark.parametrize("hidden", [12288, 16384])
@pytest.mark.parametrize("dtype", DTYPES)
def test_long_rows_backward_reads_x_and_dy_once(dev, dtype, hidden):
    """LayerNorm's and RMSNorm's backward over rows longer than registers hold (kernels:
    row_norm_backward_shared, the rows in shared memory) read x and dy once and write dx once,
    with and without the pre-norm sum's gradient (read once too); float64 rows of half the
    length (up to 8192 values a row in shared memory)."""
    if dtype == "float64":
        hidden //= 2
    acc = _acc(dtype)
    x, dy, g = (_data(dev, (8, hidden), dtype, s) for s in range(3))
    w = _data(dev, (hidden,), acc, 3)
    _, mean, rstd = bn.layer_norm_forward(x, hidden, w, w)
    _, rms_rstd = bn.rms_norm_forward(x, hidden, w)
    out: dict[str, Any] = {}
    cases = {
        "layer_norm_backward": lambda: bn.layer_norm_backward(dy, x, hidden, mean, rstd, w),
        "layer_norm_backward grad_prenorm": lambda: bn.layer_norm_backward(
            dy, x, hidden, mean, rstd, w, grad_prenorm=g),
        "rms_norm_backward": lambda: bn.rms_norm_backward(dy, x, hidden, rms_rstd, w),
        "rms_norm_backward grad_prenorm": lambda: bn.rms_norm_backward(
            dy, x, hidden, rms_rstd, w, grad_prenorm=g),
    }
    for name, call in cases.items():
        call()  # the workspace of the stream exists
        dev.SEAM.reset()
        out["dx"] = call()[0]
        kernels = [k for k, _ in dev.SEAM.traffic]
        assert any("row_norm_backward_shared" in k for k in kernels), (name, kernels)
        model = {"x": (x, 1, 0), "dy": (dy, 1, 0), "dx": (out["dx"], 0, 1)}
        if "grad_prenorm" in name:
            model["grad_prenorm"] = (g, 1, 0)
        for label, (array, reads, writes) in model.items():
            read, written = dev.SEAM.bytes(array)
            assert (read, written) == (reads * array.nbytes, writes * array.nbytes), (
                name, label, read / array.nbytes, written / array.nbytes)

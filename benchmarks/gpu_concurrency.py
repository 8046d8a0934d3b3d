"""Threads, streams, CUDA graphs, torch's streams and NCCL on a GPU: the GPU check's streams phase.

Each check prints one line ``check <name>: pass|fail|skip (detail)`` and the script writes the
outcomes as JSON (``--out``). ``--emulated`` runs the checks that the CPU execution target
models (CI's rehearsal); ``--per-thread`` runs only the per-thread default stream check (the
GPU check starts it with ``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bncupy as bn  # noqa: E402

RESULTS: dict[str, dict[str, str]] = {}


def check(name: str) -> Callable[[Callable[[Any], str | None]], Callable[[Any], None]]:
    """Run the decorated check, recording pass (or the skip reason it returns), fail, error."""
    def decorate(fn: Callable[[Any], str | None]) -> Callable[[Any], None]:
        def run(cp: Any) -> None:
            try:
                skip = fn(cp)
                outcome = ("skip", skip) if skip else ("pass", "")
            except AssertionError as exc:
                outcome = ("fail", str(exc)[:500])
            except Exception as exc:  # noqa: BLE001 - every failure is an outcome to record
                outcome = ("error", f"{type(exc).__name__}: {exc}"[:500])
            RESULTS[name] = {"outcome": outcome[0], "detail": outcome[1]}
            print(f"check {name}: {outcome[0]}{f' ({outcome[1]})' if outcome[1] else ''}",
                  flush=True)
        return run
    return decorate


def _step(cp: Any, seed: int) -> list[np.ndarray]:
    """A BatchNorm2d and a GroupNorm forward + backward on this thread's current stream."""
    rng = np.random.default_rng(seed)
    x = cp.asarray(rng.standard_normal((8, 32, 14, 14)).astype(np.float32) + 3)
    dy = cp.asarray(rng.standard_normal((8, 32, 14, 14)).astype(np.float32))
    layer, group = bn.BatchNorm2d(32), bn.GroupNorm(8, 32)
    out = [layer(x), layer.backward(dy), layer.grad_weight, layer.running_var, group(x),
           group.backward(dy), group.grad_weight]
    cp.cuda.get_current_stream().synchronize()
    return [cp.asnumpy(a) for a in out]


def _threads(fn: Callable[[int], Any], n: int = 4) -> list[Any]:
    results: list[Any] = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _same_bits(got: list[list[np.ndarray]], want: list[list[np.ndarray]]) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        for j, (a, b) in enumerate(zip(g, w, strict=True)):
            assert np.array_equal(a, b, equal_nan=True), f"thread {i}, output {j} differs"


@check("threads on separate streams")
def threads_on_streams(cp: Any) -> None:
    want = [_step(cp, i) for i in range(4)]

    def run(i: int) -> list[np.ndarray]:
        with cp.cuda.Stream(non_blocking=True):
            return _step(cp, i)

    _same_bits(_threads(run), want)


@check("threads on the per-thread default stream")
def threads_per_thread_stream(cp: Any) -> str | None:
    if cp.cuda.get_current_stream().ptr != 2:  # cudaStreamPerThread
        return "CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1 not set"
    want = [_step(cp, i) for i in range(4)]
    _same_bits(_threads(lambda i: _step(cp, i)), want)
    return None


@check("CUDA graph of a layer step")
def graph_replay(cp: Any) -> None:
    rng = np.random.default_rng(0)
    shape = (8, 32, 14, 14)
    batches = [cp.asarray(rng.standard_normal(shape).astype(np.float32)) for _ in range(4)]
    grads = [cp.asarray(rng.standard_normal(shape).astype(np.float32)) for _ in range(4)]
    captured = bn.BatchNorm2d(32, momentum=0.2, activation="relu")
    eager = bn.BatchNorm2d(32, momentum=0.2, activation="relu")
    x, dy = cp.empty(shape, cp.float32), cp.empty(shape, cp.float32)
    x[...], dy[...] = batches[0], grads[0]
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        captured.backward(captured(x))
        eager.backward(eager(batches[0]))
        stream.begin_capture()
        y = captured(x)
        dx = captured.backward(dy)
        graph = stream.end_capture()
        for step in range(1, 4):
            x[...], dy[...] = batches[step], grads[step]
            graph.launch()
            ey, edx = eager(batches[step]), eager.backward(grads[step])
            for got, want in ((y, ey), (dx, edx), (captured.running_var, eager.running_var),
                              (captured.grad_weight, eager.grad_weight)):
                assert cp.array_equal(got, want), f"replay {step} differs from eager calls"
        stream.synchronize()


@check("torch CUDA tensors on a non-default torch stream")
def torch_stream(cp: Any) -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch has no CUDA device"
    from bncupy.backends import _cuda

    stream = torch.cuda.Stream()
    x = torch.randn(8, 32, 14, 14, device="cuda") + 3
    rm, rv = torch.zeros(32, device="cuda"), torch.ones(32, device="cuda")
    with torch.cuda.stream(stream):
        y = bn.batch_norm(x, rm, rv, training=True)
        z = torch.nn.functional.relu(y)  # torch's next op on its stream reads bncupy's output
    stream.synchronize()
    ref = torch.nn.functional.batch_norm(x, torch.zeros(32, device="cuda"),
                                         torch.ones(32, device="cuda"), training=True)
    assert isinstance(y, torch.Tensor) and torch.allclose(y, ref, atol=1e-5), "values differ"
    assert torch.allclose(z, ref.relu(), atol=1e-5)
    assert torch.allclose(rm, x.mean(dim=(0, 2, 3)) * 0.1, atol=1e-5), "running mean"
    keys = [key for key in _cuda._workspaces if key[2] == stream.cuda_stream]
    assert keys, "no launch on torch's stream"
    return None


@check("torch bfloat16 CUDA tensors through DLPack (RMSNorm with a residual, batch norm)")
def torch_bfloat16(cp: Any) -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch has no CUDA device"
    g = torch.Generator(device="cuda").manual_seed(0)
    x, r = (torch.randn(64, 1024, device="cuda", generator=g).to(torch.bfloat16)
            for _ in range(2))
    w = torch.rand(1024, device="cuda", generator=g) + 0.5
    y, h = bn.rms_norm(x, 1024, w, residual=r, prenorm=True)
    assert isinstance(y, torch.Tensor) and y.dtype == h.dtype == torch.bfloat16, "dtypes"
    assert torch.equal(h, x + r), "h differs from x + r"
    ref = torch.nn.functional.rms_norm((x + r).float(), (1024,), w).to(torch.bfloat16)
    ulp = torch.finfo(torch.bfloat16).eps
    assert ((y.float() - ref.float()).abs() <= 2 * ulp * ref.float().abs() + 1e-3).all(), \
        "rms_norm values differ"
    xb = torch.randn(8, 16, 7, 7, device="cuda", generator=g).to(torch.bfloat16)
    yb = bn.batch_norm(xb, None, None, training=True)
    refb = torch.nn.functional.batch_norm(xb.float(), None, None, training=True)
    assert (yb.float() - refb).abs().max() < 0.05, "batch_norm values differ"
    return None


@check("SyncBatchNorm over a one-rank NCCL communicator")
def nccl(cp: Any) -> str | None:
    try:
        from cupyx.distributed import init_process_group

        comm = init_process_group(1, 0)
    except Exception as exc:  # noqa: BLE001 - NCCL missing is a skip with its reason
        return f"NCCL unavailable: {exc}"
    x = cp.random.default_rng(1).standard_normal((6, 3, 4), dtype=cp.float32)
    layer, plain = bn.SyncBatchNorm(3, comm=comm), bn.BatchNorm1d(3)
    assert cp.allclose(layer(x), plain(x), atol=1e-6), "outputs differ"
    dy = cp.ones_like(x)
    assert cp.allclose(layer.backward(dy), plain.backward(dy), atol=1e-6), "gradients differ"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON file for the outcomes")
    parser.add_argument("--emulated", action="store_true", help="the CPU execution target")
    parser.add_argument("--per-thread", action="store_true",
                        help="only the per-thread default stream check")
    args = parser.parse_args(argv)
    if args.emulated:
        from tests import emulated
        from tests.emulated import device

        emulated.install()
        device.per_thread_default_stream = os.environ.get(
            "CUPY_CUDA_PER_THREAD_DEFAULT_STREAM") == "1"
    from bncupy.backends import cupy as cupy_backend

    cp = cupy_backend.require()
    with bn.use_backend("cupy"):
        if args.per_thread:
            threads_per_thread_stream(cp)
        else:
            threads_on_streams(cp)
            graph_replay(cp)
            if not args.emulated:  # torch and NCCL need a real device
                torch_stream(cp)
                torch_bfloat16(cp)
                nccl(cp)
    if args.out:
        args.out.write_text(json.dumps(RESULTS, indent=1))
    return 0 if all(r["outcome"] in ("pass", "skip") for r in RESULTS.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

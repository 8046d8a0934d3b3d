"""Command line: ``bncupy info``, ``bench`` and ``demo`` (also via ``python -m bncupy``)."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import __version__
from ._errors import BackendUnavailableError
from ._functional import batch_norm_backward, batch_norm_forward
from .backends import cupy as cupy_backend
from .backends import dispatch
from .backends import numpy as numpy_backend

# What the README says: bncupy is not on PyPI, so the CUDA extras install from a checkout.
CUDA_INSTALL_HINT = "from a checkout of bncupy: python3 -m pip install '.[cuda12]' or '.[cuda13]'"


def _reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, dy: np.ndarray):
    """Plain float64 textbook formulas, independent of the backends."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = x.mean(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(x.var(axis=axes, keepdims=True) + 1e-5)
    xhat = (x - mean) * invstd
    y = xhat * w.reshape(shape) + b.reshape(shape)
    g = dy * w.reshape(shape)
    dx = invstd * (g - g.mean(axis=axes, keepdims=True)
                   - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    return y, dx


def self_check(backend: str) -> float:
    """Largest error of ``backend`` against the float64 reference on a small tensor."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5, 6)) * 2.0 + 7.0
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    dy = rng.standard_normal(x.shape)
    y_ref, dx_ref = _reference(x, w, b, dy)
    module = dispatch.module_for(backend)
    args = [module.asarray(a) for a in (x, w, b, dy)]
    with dispatch.use_backend(backend):
        y, mean, invstd = batch_norm_forward(args[0], None, None, args[1], args[2], True)
        dx, _, _ = batch_norm_backward(args[3], args[0], args[1], mean, invstd)
    to_np = dispatch.module_for("numpy").asarray
    return float(max(np.abs(to_np(y) - y_ref).max(), np.abs(to_np(dx) - dx_ref).max()))


ENGINES = {"numba": "numba (compiled loops)", "numpy": "numpy (pure-NumPy passes)"}


def info() -> int:
    print(f"bncupy {__version__}")
    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"numpy {np.__version__}")
    try:
        import cupy
        print(f"cupy {cupy.__version__}")
    except ImportError:
        print("cupy not installed")
    print(f"backend setting: {dispatch.configured_backend()} (in force: {dispatch.get_backend()})")
    status = 0
    for name in ("numpy", "cupy"):
        reason = None if name == "numpy" else cupy_backend.unavailable_reason()
        if reason is not None:
            # an older backend's hint named a PyPI release that does not exist
            old = getattr(cupy_backend, "_INSTALL_HINT", CUDA_INSTALL_HINT)
            print(f"backend {name}: unavailable: {reason.replace(old, CUDA_INSTALL_HINT)}")
            continue
        if name == "cupy":
            print(f"  device: {cupy_backend.device_summary()}")
        err = self_check(name)
        ok = err < 1e-9
        status |= not ok
        print(f"backend {name}: available; self-check max error {err:.1e} "
              f"{'OK' if ok else 'FAILED'}")
        if name == "numpy":
            engine, why = numpy_backend.engine_status()
            print(f"  cpu engine: {ENGINES[engine]}: {why}")
    return status


# Modules of the 'demo' extra the demo cannot run without (tqdm, also in it, is optional).
DEMO_REQUIREMENTS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def missing_demo_requirements() -> list[str]:
    """Distributions of the 'demo' extra whose modules cannot be imported here."""
    return [dist for module, dist in DEMO_REQUIREMENTS.items()
            if importlib.util.find_spec(module) is None]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bncupy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backend availability, device, self-check")
    bench = sub.add_parser("bench", help="GPU suite + ResNet-50 shape benchmark -> GPU record")
    bench.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                       help="directory for the GPU record (default: benchmarks/results)")
    bench.add_argument("--quick", action="store_true", help="batch 32 only, 5 repetitions")
    bench.add_argument("--no-suite", action="store_true", help="skip running the test suite")
    sub.add_parser("gpu-check", add_help=False,
                   help="the prepared GPU proof: suite, sanitizers, streams, bench -> record")
    from .demo import MEASURED_TIMINGS

    demo = sub.add_parser(
        "demo", help="train with and without batch norm on sklearn digits; write explorer.html",
        description="Train the BN paper's sigmoid MLP and a small convnet on sklearn's digits "
                    "with and without batch normalization; write summary.json, history.json, "
                    "PNG figures and explorer.html (an interactive page, no network needed). "
                    f"Measured: {MEASURED_TIMINGS}")
    demo.add_argument("--out", type=Path, default=None,
                      help="output directory (default: a new demo-YYYYmmdd-HHMMSS/ here)")
    demo.add_argument("--quick", action="store_true",
                      help="600 steps per arm instead of 5000")
    demo.add_argument("--seed", type=int, default=0, help="seed for data split and weights")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gpu-check"]:
        from . import _gpu_check

        return _gpu_check.cli(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "demo":
        missing = missing_demo_requirements()
        if missing:
            print(f"bncupy demo needs the 'demo' extra, which is not installed (missing: "
                  f"{', '.join(missing)}); from the repository root: "
                  f"python3 -m pip install \".[demo]\"", file=sys.stderr)
            return 2
        from . import demo as demo_module

        out = args.out or Path(time.strftime("demo-%Y%m%d-%H%M%S"))
        demo_module.run(out, quick=args.quick, seed=args.seed)
        return 0
    from . import _bench

    try:
        return _bench.main(args.out, args.quick, not args.no_suite)
    except BackendUnavailableError as exc:
        print(f"bncupy bench needs a GPU: {exc}", file=sys.stderr)
        return 2

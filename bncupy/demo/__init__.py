"""``bncupy demo``: what batch normalization does, reproduced on sklearn's digits.

Every BN layer (forward and backward) is bncupy's, on the GPU when CuPy can run and with NumPy
otherwise. Writes ``summary.json`` (the design notes' schema), ``history.json`` (the curves),
PNG figures and ``explorer.html`` (an interactive, self-contained page) into the output directory.

The demo's matrix products are tiny (batches of 60), so it runs BLAS on one thread: more threads
only spin, and on a loaded machine they multiplied the run time several times over.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..backends import dispatch
from . import experiments, explorer, figures

TARGET_ACCURACY = 0.9
BATCH = 60
BLAS_THREADS = 1  # see the module docstring
# From benchmarks/demo_timing.py on this project's 2-core machine; docs/guide/demo.md quotes it
# verbatim.
MEASURED_TIMINGS = ("full run 28.5 s wall (21.7-30.2 s), 19.9 s CPU (19.2-20.1 s); --quick 8.5 s "
                    "wall (8.5-9.4 s), 5.7 s CPU (5.4-6.0 s); medians of 3 runs of "
                    "benchmarks/demo_timing.py on this project's 2-core machine shared with other "
                    "jobs (load average 2.6-4.0), 2026-12-04")


def _progress_bar(total: int, description: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=description, unit="step", leave=True)


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run every arm, write the outputs into ``out_dir``; returns the summary."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        return _run(out_dir, quick, seed)


def _run(out_dir: Path, quick: bool, seed: int) -> dict[str, Any]:
    start, cpu_start = time.perf_counter(), time.process_time()
    backend = dispatch.get_backend()
    xp = dispatch.module_for(backend).xp
    data = experiments.load_digits(xp, seed)
    steps, eval_every = (600, 10) if quick else (5000, 25)
    results = []
    for arm in experiments.arms(lr=0.5, conv_lr=0.05):
        bar = _progress_bar(steps, arm.name)
        results.append(experiments.train(xp, data, arm, steps, BATCH, eval_every, seed,
                                         progress=bar.update if bar else lambda n: None))
        if bar:
            bar.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "target_accuracy": TARGET_ACCURACY,
        "arms": [{"name": r.arm.name, "batch_norm": r.arm.batch_norm, "lr": r.arm.lr,
                  "steps_to_target": r.steps_to(TARGET_ACCURACY),
                  "final_test_accuracy": r.test_accuracy[-1]} for r in results],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    history = {"backend": backend, "seed": seed, "quick": quick,
               "percentiles": list(experiments.PERCENTILES),
               "arms": [{"name": r.arm.name, "steps": r.steps, "test_accuracy": r.test_accuracy,
                         "train_loss": r.loss,
                         "sigmoid_input_percentiles": r.sigmoid_input_percentiles}
                        for r in results]}
    (out_dir / "history.json").write_text(json.dumps(history) + "\n")
    figures.accuracy_curves(results, TARGET_ACCURACY, out_dir / "accuracy.png")
    figures.percentile_bands(results[0], results[1], out_dir / "sigmoid_percentiles.png")
    figures.distributions(out_dir / "distributions.png", seed)
    findings = verdict(summary)
    explorer.write(out_dir / "explorer.html", seed, (out_dir / "accuracy.png").read_bytes(),
                   [f"{'Quick' if quick else 'Full'} run ({steps} steps per arm, batches of "
                    f"{BATCH}), seed {seed}, {backend} backend."] + findings, backend)
    print(f"Ran {len(results)} arms and wrote the figures and explorer.html in "
          f"{time.perf_counter() - start:.1f} s ({time.process_time() - cpu_start:.1f} s of CPU) "
          f"on the {backend} backend with {BLAS_THREADS} BLAS "
          f"thread{'' if BLAS_THREADS == 1 else 's'}; outputs in {out_dir}/.")
    print("\n".join(f"- {line}" for line in findings))
    return summary


def verdict(summary: dict[str, Any]) -> list[str]:
    """A sentence per BN arm, comparing it with its no-BN twin."""
    arms = summary["arms"]
    lines: list[str] = []
    for plain, normed in zip(arms[::2], arms[1::2], strict=True):
        def reach(arm: dict[str, Any]) -> str:
            steps = arm["steps_to_target"]
            return "never" if steps is None else f"in {steps} steps"

        faster = normed["steps_to_target"] is not None and (
            plain["steps_to_target"] is None
            or normed["steps_to_target"] < plain["steps_to_target"])
        lines.append(
            f"{normed['name']} reached {summary['target_accuracy']:.0%} test accuracy "
            f"{reach(normed)} (final {normed['final_test_accuracy']:.1%}); {plain['name']} "
            f"{reach(plain)} (final {plain['final_test_accuracy']:.1%}): BN "
            f"{'trained faster' if faster else 'did not train faster here'}.")
    return lines

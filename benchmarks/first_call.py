"""The first call's cost in a new process: Numba's JIT cache cold (compiling) and warm (loading).

usage: python benchmarks/first_call.py [--runs 5] [--json FILE]

Each run starts fresh interpreters: one with an empty ``NUMBA_CACHE_DIR`` (cold: the compiled
engine's loops are compiled, then written to that directory), then one that finds them there
(warm). In each, the time from before ``import bncupy`` to the end of the first forward-train
and backward call (float32, NCHW, 8x16x8x8; wall and process CPU), then the first calls of every
other case the benchmarks use (float16 and float32, channel first and channels last: more
specialisations to compile or load). The pure-NumPy engine (``BNCUPY_CPU_ENGINE=numpy``) is
timed alongside as the baseline: importing NumPy and bncupy. Medians and ranges over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, time
w0, c0 = time.perf_counter(), time.process_time()
import numpy as np
import bncupy as bn
from bncupy.backends import numpy as nb

def fwd_bwd(shape, dtype, axis):
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype) + 5
    y, mean, invstd = bn.batch_norm_forward(x, None, None, training=True, axis=axis)
    bn.batch_norm_backward(np.ones_like(y), x, None, mean, invstd, axis=axis)
    bn.batch_norm(x, mean, 1 / invstd ** 2, training=False, axis=axis)

fwd_bwd((8, 16, 8, 8), np.float32, 1)
first = (time.perf_counter() - w0, time.process_time() - c0)
w1 = time.perf_counter()
for dtype in (np.float32, np.float16):
    for shape, axis in (((8, 16, 8, 8), 1), ((8, 8, 8, 16), -1), ((64, 16), 1)):
        fwd_bwd(shape, dtype, axis)
print(json.dumps({"engine": nb.engine_status()[0], "first_wall": first[0], "first_cpu": first[1],
                  "rest_wall": time.perf_counter() - w1}))
"""


def child(env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="also write the runs to this file")
    args = parser.parse_args()
    base = {**os.environ, "PYTHONPATH": str(ROOT), "BNCUPY_NUM_THREADS": "1"}
    base.pop("BNCUPY_CPU_ENGINE", None)
    runs: dict[str, list[dict[str, float]]] = {"cold": [], "warm": [], "numpy engine": []}
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as cache:
            env = {**base, "NUMBA_CACHE_DIR": cache}
            runs["cold"].append(child(env))
            runs["warm"].append(child(env))
        runs["numpy engine"].append(child({**base, "BNCUPY_CPU_ENGINE": "numpy"}))
    print(f"first forward-train + backward + eval in a new process, {args.runs} runs "
          f"(median, range); then every other dtype and layout")
    for name, rs in runs.items():
        cols = []
        for key in ("first_wall", "first_cpu", "rest_wall"):
            v = [r[key] for r in rs]
            cols.append(f"{key} {np.median(v):.2f} s ({min(v):.2f}-{max(v):.2f})")
        print(f"  {name:13} [{rs[0]['engine']}] " + ", ".join(cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()

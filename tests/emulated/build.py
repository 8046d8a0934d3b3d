"""Build the kernels for the CPU: one shared library per set of kernel specialisations.

The translation unit is ``cuda_emu.h`` + the unchanged kernel sources + a table of entries, one per
specialisation the CuPy backend launches (:func:`bncupy.backends.cupy.name_expressions`). Builds
are cached under ``build/emulated/`` in the repository, keyed by the sources, names and flags.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bncupy.backends import cupy as cupy_backend

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = REPO / "build" / "emulated"
FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-ffp-contract=off",
         "-fno-threadsafe-statics", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused")

# Element names of the kernels' struct types, for the launch-time argument checks.
KERNEL_TYPES = """
template <> struct bncupy_emu::scalar_name<bncupy::half_t> { static constexpr const char* value = "f16"; };
template <> struct bncupy_emu::scalar_name<bncupy::bf16_t> { static constexpr const char* value = "bf16"; };
template <typename A> struct bncupy_emu::scalar_name<bncupy::Welford<A>> : bncupy_emu::scalar_name<A> {};
template <typename A> struct bncupy_emu::scalar_name<bncupy::SumPair<A>> : bncupy_emu::scalar_name<A> {};
"""


def translation_unit(names: Sequence[str], sources: Sequence[str], types: str) -> str:
    includes = "".join(f'#include "{s}"\n' for s in sources)
    entries = ",\n".join(f'    bncupy_emu::entry("{n}", &{n})' for n in names)
    return (f'#include "cuda_emu.h"\n{includes}{types}\n'
            f"const bncupy_emu::Entry bncupy_emu_table[] = {{\n{entries}\n}};\n"
            f"const int bncupy_emu_table_size = {len(names)};\n")


def _digest(kernel_dir: Path, text: str) -> str:
    h = hashlib.sha256(text.encode())
    for p in sorted([*kernel_dir.glob("*.cu*"), HERE / "cuda_emu.h"]):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(" ".join(FLAGS).encode())
    return h.hexdigest()[:20]


def build(names: Sequence[str] | None = None, kernel_dir: Path | None = None,
          sources: Sequence[str] = cupy_backend.SOURCES, types: str = KERNEL_TYPES) -> Path:
    """Compile ``names`` (default: every specialisation the backend launches) from ``sources`` in
    ``kernel_dir`` (default: the repository's kernels) and return the shared library's path;
    ``types`` names the element type of each struct a kernel takes a pointer to."""
    from bncupy._kernels import kernel_dir as default_dir

    kernel_dir = Path(kernel_dir or default_dir())
    names = sorted(names or cupy_backend.name_expressions())
    text = translation_unit(names, sources, types)
    target = CACHE / f"kernels-{_digest(kernel_dir, text)}.so"
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        src = Path(tmp) / "emulated.cpp"
        src.write_text(text)
        out = Path(tmp) / "kernels.so"
        cmd = [os.environ.get("CXX", "g++"), *FLAGS, f"-I{HERE}", f"-I{kernel_dir}", str(src),
               "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"building the kernels for the CPU failed:\n{' '.join(cmd)}\n"
                               f"{proc.stderr[-20000:]}")
        os.replace(out, target)  # atomic: concurrent builders (pytest-xdist workers) agree
    return target

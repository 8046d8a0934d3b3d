"""Locate the CUDA kernel sources (``kernels/*.cu``, ``*.cuh``) in a wheel or a source checkout."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def kernel_dir() -> Path:
    """Directory holding the kernel sources.

    An installed wheel ships them as ``bncupy/_kernels``; an editable install or a plain checkout
    reads the repository's top-level ``kernels/``.
    """
    for candidate in (_PACKAGE / "_kernels", _PACKAGE.parent / "kernels"):
        if (candidate / "welford.cuh").is_file():
            return candidate
    raise FileNotFoundError(f"bncupy's CUDA kernel sources were not found next to {_PACKAGE}: "
                            "reinstall bncupy (the wheel ships them as bncupy/_kernels)")


def kernel_files() -> list[Path]:
    """All kernel source files, sorted by name."""
    return sorted(p for p in kernel_dir().iterdir() if p.suffix in {".cu", ".cuh", ".h"})


def read_source(name: str) -> str:
    """Text of kernel source ``name`` (e.g. ``"forward.cu"``)."""
    return (kernel_dir() / name).read_text(encoding="utf-8")


def kernels_digest(base: Path | None = None) -> str:
    """sha256 over ``**/*.cu``, ``*.cuh``, ``*.h`` in sorted relative POSIX path order, each
    fed as path, NUL, bytes, NUL (the GPU record's ``kernels_digest``)."""
    base = base or kernel_dir()
    suffixes = {".cu", ".cuh", ".h"}
    files = sorted((p for p in base.rglob("*") if p.is_file() and p.suffix in suffixes),
                   key=lambda p: p.relative_to(base).as_posix())
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(base).as_posix().encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()

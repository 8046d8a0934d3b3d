"""Backend selection: ``BNCUPY_BACKEND``, :func:`set_backend`, :func:`use_backend`.

The process-wide default comes from ``BNCUPY_BACKEND`` (default ``auto``) and can be replaced with
:func:`set_backend`; :func:`use_backend` overrides it for the current context only (a
:mod:`contextvars` variable, so threads and asyncio tasks do not see each other's choice).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from . import _cuda
from . import cupy as cupy_backend
from . import numpy as numpy_backend

BACKENDS = ("auto", "numpy", "cupy")
_MODULES = {"numpy": numpy_backend, "cupy": cupy_backend}

_default: str | None = None  # None until set_backend or the first lookup reads the environment
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("bncupy_backend", default=None)


def _checked_name(name: object, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{source} must be a str, one of {BACKENDS}; got {type(name).__name__}")
    key = name.strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return key


def configured_backend() -> str:
    """The backend name in force, ``auto`` included (context override, else process default)."""
    global _default
    name = _override.get()
    if name is not None:
        return name
    if _default is None:
        _default = _checked_name(os.environ.get("BNCUPY_BACKEND", "auto") or "auto",
                                 "environment variable BNCUPY_BACKEND")
    return _default


def get_backend() -> str:
    """Return the backend in force now: ``"numpy"`` or ``"cupy"``.

    Under ``auto`` computation follows each call's input; this returns the backend ``auto``
    gives new arrays (layer state): ``"cupy"`` when it can run here, else ``"numpy"``.
    """
    name = configured_backend()
    if name == "auto":
        return "cupy" if cupy_backend.unavailable_reason() is None else "numpy"
    return name


def set_backend(name: str) -> None:
    """Set the process-wide backend: ``"auto"``, ``"numpy"`` or ``"cupy"``.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the valid ones).
    BackendUnavailableError
        For ``"cupy"`` where CuPy cannot run; the previous setting stays.
    """
    global _default
    key = _checked_name(name, "backend")
    if key == "cupy":
        cupy_backend.require()
    _default = key


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` inside a ``with`` block, in this thread/task only."""
    key = _checked_name(name, "backend")
    if key == "cupy":
        cupy_backend.require()
    token = _override.set(key)
    try:
        yield
    finally:
        _override.reset(token)


_kinds: dict[type, str | None] = {}
_kinds_runtime: list[Any] = [None]  # the runtime whose answers _kinds holds


def known_kinds() -> dict[type, str | None]:
    """The types :func:`array_kind` has classified under the current runtime, and their kinds
    (a lookup table for hot paths; a type missing from it is not classified yet)."""
    if _kinds_runtime[0] is not _cuda._runtime:
        _kinds.clear()
        _kinds_runtime[0] = _cuda._runtime
    return _kinds


def array_kind(value: Any) -> str | None:
    """``"numpy"`` or ``"cupy"`` for an ndarray of that library, else ``None``.

    Device arrays are recognised by the CuPy backend's runtime (CuPy's by type, so no CuPy
    import or GPU is needed to classify arrays); the answer is cached per type and runtime.
    """
    cls = type(value)
    kind = _kinds.get(cls, "?")
    if kind != "?" and _kinds_runtime[0] is _cuda._runtime:
        return kind
    if _kinds_runtime[0] is not _cuda._runtime:
        _kinds.clear()
        _kinds_runtime[0] = _cuda._runtime
    if isinstance(value, numpy_backend.np.ndarray):
        kind = "numpy"
    elif cupy_backend.is_array(value):
        kind = "cupy"
    else:
        kind = None
    if len(_kinds) > 256:
        _kinds.clear()
    _kinds[cls] = kind
    return kind


def backend_for(kind: str, name: str | None = None) -> ModuleType:
    """The backend module that computes for input of array kind ``kind`` under the current setting
    (``name``: :func:`configured_backend`, when the caller has it already)."""
    if name is None:
        name = configured_backend()
    if name == "auto":
        name = kind
    if name == "cupy" and _cuda._runtime is not _usable[0]:
        cupy_backend.require()
        _usable[0] = _cuda._runtime  # a runtime that could run once always can
    return _MODULES[name]


_usable: list[Any] = [None]  # the runtime the cupy backend last found usable


def module_for(kind: str) -> ModuleType:
    """The backend module whose arrays are of ``kind``."""
    return _MODULES[kind]

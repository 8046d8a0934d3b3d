"""Array helpers for tests that hold arrays of either kind (a layer's state may live on the
device: under ``auto`` layers are built where the CuPy backend can run)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bncupy.backends import dispatch


def assign(target: Any, values: Any) -> None:
    """``target[...] = values`` with ``values`` moved to ``target``'s array kind first (CuPy
    refuses NumPy arrays and lists on the right of a device assignment)."""
    target[...] = dispatch.module_for(dispatch.array_kind(target) or "numpy").asarray(
        np.asarray(values, dtype=target.dtype))


def to_numpy(a: Any) -> np.ndarray:
    """A host copy of an array of either kind."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)

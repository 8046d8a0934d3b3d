"""A minimal array library of its own (neither NumPy nor CuPy) that speaks DLPack, so interop
runs in every environment; torch and JAX tests use the real libraries where installed."""

from __future__ import annotations

import types
from typing import Any

import numpy as np


class HostArray:
    """Host memory behind ``__dlpack__``/``__dlpack_device__`` and an array-API namespace whose
    ``from_dlpack`` makes another :class:`HostArray` (that is how bncupy gives results back)."""

    def __init__(self, data: np.ndarray, device_type: int = 1) -> None:
        self.data = data
        self.device_type = device_type

    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self.data.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (self.device_type, 0)

    def __array_namespace__(self, api_version: Any = None) -> Any:
        return namespace


def from_dlpack(x: Any) -> HostArray:
    return HostArray(np.from_dlpack(x))


namespace = types.SimpleNamespace(from_dlpack=from_dlpack)

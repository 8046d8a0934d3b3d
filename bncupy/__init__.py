"""bncupy: batch normalization for CuPy and NumPy arrays, with torch's signatures and semantics."""

from ._errors import BackendUnavailableError
from ._fold import fold_into
from ._functional import batch_norm, batch_norm_backward, batch_norm_forward, moments, welford
from ._layers import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ._moments import Moments
from ._sync import (
    SyncBatchNorm,
    batch_norm_backward_elemt,
    batch_norm_backward_reduce,
    batch_norm_elemt,
    batch_norm_gather_stats,
    batch_norm_stats,
)
from .backends.dispatch import get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Moments",
    "SyncBatchNorm",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_backward_elemt",
    "batch_norm_backward_reduce",
    "batch_norm_elemt",
    "batch_norm_forward",
    "batch_norm_gather_stats",
    "batch_norm_stats",
    "fold_into",
    "get_backend",
    "moments",
    "set_backend",
    "use_backend",
    "welford",
]

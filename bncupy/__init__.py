"""bncupy: batch normalization for CuPy and NumPy arrays, with torch's signatures and semantics."""

from ._errors import BackendUnavailableError
from ._fold import fold_into
from ._functional import batch_norm, batch_norm_backward, batch_norm_forward, moments, welford
from ._layers import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ._moments import Moments
from .backends.dispatch import get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Moments",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "fold_into",
    "get_backend",
    "moments",
    "set_backend",
    "use_backend",
    "welford",
]

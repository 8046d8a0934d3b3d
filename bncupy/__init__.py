"""bncupy: batch normalization for CuPy and NumPy arrays, with torch's signatures and semantics."""

from ._backend import get_backend, set_backend, use_backend
from ._errors import BackendUnavailableError
from ._fold import fold_into
from ._functional import batch_norm, batch_norm_backward, batch_norm_forward, moments, welford
from ._layers import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ._moments import Moments
from ._norm_layers import (
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RMSNorm,
)
from ._norms import (
    group_norm,
    group_norm_backward,
    group_norm_forward,
    instance_norm,
    instance_norm_backward,
    instance_norm_forward,
)
from ._renorm import batch_renorm, batch_renorm_backward, batch_renorm_forward
from ._row_norms import (
    layer_norm,
    layer_norm_backward,
    layer_norm_forward,
    rms_norm,
    rms_norm_backward,
    rms_norm_forward,
)
from ._sync import (
    SyncBatchNorm,
    batch_norm_backward_elemt,
    batch_norm_backward_reduce,
    batch_norm_elemt,
    batch_norm_gather_stats,
    batch_norm_stats,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "Moments",
    "RMSNorm",
    "SyncBatchNorm",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_backward_elemt",
    "batch_norm_backward_reduce",
    "batch_norm_elemt",
    "batch_norm_forward",
    "batch_norm_gather_stats",
    "batch_norm_stats",
    "batch_renorm",
    "batch_renorm_backward",
    "batch_renorm_forward",
    "fold_into",
    "get_backend",
    "group_norm",
    "group_norm_backward",
    "group_norm_forward",
    "instance_norm",
    "instance_norm_backward",
    "instance_norm_forward",
    "layer_norm",
    "layer_norm_backward",
    "layer_norm_forward",
    "moments",
    "rms_norm",
    "rms_norm_backward",
    "rms_norm_forward",
    "set_backend",
    "use_backend",
    "welford",
]

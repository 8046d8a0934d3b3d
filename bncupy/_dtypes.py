"""The floating dtypes bncupy computes on: float16, bfloat16 (``ml_dtypes.bfloat16``, the NumPy
dtype CuPy 14 and JAX use too), float32 and float64."""

from __future__ import annotations

import numpy as np

try:
    import ml_dtypes
except ImportError:  # a dependency; without it bfloat16 arrays cannot exist in NumPy
    BFLOAT16 = None
else:
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

FLOAT_DTYPES = tuple(np.dtype(d) for d in (np.float16, BFLOAT16, np.float32, np.float64)
                     if d is not None)
NAMES = "float16, bfloat16, float32 or float64"
# the accumulator (statistics) dtype of each
ACC = {d: np.dtype(np.float64 if d == np.float64 else np.float32) for d in FLOAT_DTYPES}

"""Mergeable per-channel statistics (count, mean, M2) and the one Chan et al. merge."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from ._interop import is_foreign, merge_moments
from .backends._common import merge
from .backends.dispatch import array_kind


@dataclass(frozen=True, eq=False)
class Moments:
    """Per-channel partial statistics of a batch, mergeable across batches or processes.

    Attributes
    ----------
    count : int
        Values per channel (the same for every channel).
    mean : ndarray, shape (C,)
        Per-channel mean.
    m2 : ndarray, shape (C,)
        Per-channel sum of squared deviations from ``mean``.
    """

    count: int
    mean: Any
    m2: Any

    @property
    def num_channels(self) -> int:
        return int(self.mean.shape[0])

    def merge(self, other: Moments) -> Moments:
        """Statistics of the union of both batches (Chan et al.), exact up to rounding.

        Raises
        ------
        TypeError
            If ``other`` is not a :class:`Moments` or holds another array kind.
        ValueError
            If the channel counts differ.
        """
        if not isinstance(other, Moments):
            raise TypeError(f"other must be a Moments, got {type(other).__name__}")
        if other.num_channels != self.num_channels:
            raise ValueError(f"other has {other.num_channels} channels, expected "
                             f"{self.num_channels}")
        if is_foreign(self.mean) or is_foreign(other.mean):  # torch, JAX, ...: through views
            return merge_moments(self, other)
        if array_kind(other.mean) != array_kind(self.mean):
            raise TypeError(f"other holds {array_kind(other.mean)} arrays, expected "
                            f"{array_kind(self.mean)} arrays")
        dtype = self.mean.dtype if self.mean.dtype.itemsize >= other.mean.dtype.itemsize \
            else other.mean.dtype
        count, mean, m2 = merge((self.count, self.mean.astype(dtype), self.m2.astype(dtype)),
                                (other.count, other.mean.astype(dtype), other.m2.astype(dtype)))
        return Moments(count, mean, m2)

    def var(self, ddof: int = 0) -> Any:
        """Per-channel variance ``m2 / (count - ddof)``; NaN where ``count <= ddof``."""
        if isinstance(ddof, bool) or not isinstance(ddof, numbers.Integral) or ddof < 0:
            raise ValueError(f"ddof must be a non-negative int, got {ddof!r}")
        denom = self.count - int(ddof)
        if denom <= 0:
            return self.m2 * float("nan")
        return self.m2 / denom

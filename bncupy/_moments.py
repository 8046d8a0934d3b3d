"""Mergeable per-channel statistics (count, mean, M2) and the one Chan et al. merge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _validation as v
from ._interop import is_foreign, merge_moments
from .backends._common import merge, quiet


@dataclass(frozen=True, eq=False)
class Moments:
    """Per-channel partial statistics of a batch, mergeable across batches or processes.

    :func:`welford` and :func:`batch_norm_stats` make them; the fields are attributes of the
    same names.

    Parameters
    ----------
    count : int
        Values per channel (the same for every channel).
    mean : ndarray, shape (C,)
        Per-channel mean.
    m2 : ndarray, shape (C,)
        Per-channel sum of squared deviations from ``mean``.

    Raises
    ------
    TypeError
        ``count`` is not an int, or ``mean``/``m2`` are not float arrays of one kind.
    ValueError
        ``count`` is negative or beyond int64, or ``mean``/``m2`` are not 1-D of one length.

    Examples
    --------
    >>> m = bn.Moments(2, np.array([1.0, 5.0]), np.array([2.0, 8.0]))
    >>> m.merge(bn.welford(np.array([[4.0, 2.0]]))).mean
    array([2., 4.])
    """

    count: int
    mean: Any
    m2: Any

    def __post_init__(self) -> None:
        """Check the fields (a hand-built ``Moments`` included); ``count`` is stored as an int."""
        object.__setattr__(self, "count", v.check_int(self.count, "count"))
        foreign = is_foreign(self.mean) and is_foreign(self.m2)  # torch, JAX, ...: as given
        if not foreign:
            kinds = {arg: v.check_array(value, arg) for arg, value in (("mean", self.mean),
                                                                      ("m2", self.m2))}
            v.check_same_kind(kinds)
        for arg, value in (("mean", self.mean), ("m2", self.m2)):
            if not foreign:
                v.check_float(value, arg)
            if value.ndim != 1:
                raise ValueError(f"{arg} must be 1-D (one value per channel), got shape "
                                 f"{tuple(value.shape)}")
        if self.m2.shape != self.mean.shape:
            raise ValueError(f"m2 must have the shape of mean {tuple(self.mean.shape)}, got "
                             f"{tuple(self.m2.shape)}")

    @property
    def num_channels(self) -> int:
        """Number of channels C.

        Examples
        --------
        >>> bn.welford(np.zeros((4, 3))).num_channels
        3
        """
        return int(self.mean.shape[0])

    @quiet
    def merge(self, other: Moments) -> Moments:
        """Statistics of the union of both batches (Chan et al.), exact up to rounding.

        Parameters
        ----------
        other : Moments
            Statistics of another batch, same channels and array kind.

        Returns
        -------
        Moments
            Of both batches together, in the wider of the two dtypes.

        Raises
        ------
        TypeError
            If ``other`` is not a :class:`Moments` or holds another array kind.
        ValueError
            If the channel counts differ.

        Examples
        --------
        >>> x = np.arange(12.0).reshape(4, 3)
        >>> bn.welford(x[:1]).merge(bn.welford(x[1:])).mean
        array([4.5, 5.5, 6.5])
        """
        if not isinstance(other, Moments):
            raise TypeError(f"other must be a Moments, got {type(other).__name__}")
        if other.num_channels != self.num_channels:
            raise ValueError(f"other has {other.num_channels} channels, expected "
                             f"{self.num_channels}")
        if is_foreign(self.mean) or is_foreign(other.mean):  # torch, JAX, ...: through views
            return merge_moments(self, other)
        mine, theirs = v.check_array(self.mean, "mean"), v.check_array(other.mean, "other.mean")
        if mine != theirs:
            raise TypeError(f"other holds {theirs} arrays, expected {mine} arrays")
        if self.count + other.count > v.MAX_COUNT:
            raise ValueError(f"other.count: the merged count {self.count + other.count} would "
                             f"exceed {v.MAX_COUNT}")
        dtype = self.mean.dtype if self.mean.dtype.itemsize >= other.mean.dtype.itemsize \
            else other.mean.dtype
        count, mean, m2 = merge((self.count, self.mean.astype(dtype), self.m2.astype(dtype)),
                                (other.count, other.mean.astype(dtype), other.m2.astype(dtype)))
        return Moments(count, mean, m2)

    def var(self, ddof: int = 0) -> Any:
        """Per-channel variance ``m2 / (count - ddof)``.

        Parameters
        ----------
        ddof : int
            Delta degrees of freedom: 0 for the biased variance, 1 for the unbiased one.

        Returns
        -------
        ndarray, shape (C,)
            NaN where ``count <= ddof``.

        Examples
        --------
        >>> m = bn.welford(np.arange(12.0).reshape(4, 3))
        >>> m.var(), m.var(ddof=1)
        (array([11.25, 11.25, 11.25]), array([15., 15., 15.]))
        """
        ddof = v.check_int(ddof, "ddof")
        denom = self.count - ddof
        if denom <= 0:
            return self.m2 * float("nan")
        return self.m2 / denom

"""The one Chan et al. merge of Welford partials, shared by every backend and by SyncBatchNorm."""

from __future__ import annotations

from typing import Any

Partial = tuple[int, Any, Any]


def merge(a: Partial, b: Partial) -> Partial:
    """Merge two ``(count, mean, m2)`` partials; works on NumPy and CuPy arrays alike."""
    na, ma, qa = a
    nb, mb, qb = b
    if nb == 0:
        return a
    if na == 0:
        return b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), qa + qb + delta * delta * (na * nb / n)

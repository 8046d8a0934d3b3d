"""Memory layout: compute in the layout an input already has, and give results that layout.

The backends walk C-contiguous arrays, channels-first (channel axis 1) or channels-last (channel
axis innermost). An ``axis=1`` input whose memory is channels-last (torch's ``channels_last``:
logical NCHW, NHWC strides), or an ``axis=-1`` input whose memory is channels-first, is a
C-contiguous array once its channel axis is moved to the other end: that transposed *view* is
what the backends get (no copy; the CuPy backend then picks its channels-last or channels-first
kernels by itself), and outputs are transposed back, so they have the input's strides, as torch
preserves the memory format.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Layout(NamedTuple):
    """How the backends see an input: ``perm`` applied to every input-shaped array, the channel
    axis ``axis`` of the permuted view; ``perm`` is None when the input is used as it is."""

    perm: tuple[int, ...] | None
    axis: int

    @classmethod
    def of(cls, x: Any, axis: int) -> Layout:
        """The layout to compute ``x`` (channel axis ``axis`` >= 1) in."""
        ndim = x.ndim
        if ndim < 3 or x.flags.c_contiguous or axis not in (1, ndim - 1):
            return _AS_IS.get(axis) or cls(None, axis)
        others = tuple(range(1, ndim))
        if axis == 1:  # memory N...C?
            perm, moved = (0, *others[1:], 1), ndim - 1
        else:  # memory NC...?
            perm, moved = (0, ndim - 1, *others[:-1]), 1
        if x.transpose(perm).flags.c_contiguous:
            return cls(perm, moved)
        return cls(None, axis)

    def view(self, a: Any) -> Any:
        """``a`` (input-shaped, or None) as the backends see it."""
        return a if a is None or self.perm is None else a.transpose(self.perm)

    def restore(self, a: Any) -> Any:
        """A backend result shaped like :meth:`view`'s, back in the caller's axis order."""
        if self.perm is None:
            return a
        inverse = [0] * len(self.perm)
        for position, source in enumerate(self.perm):
            inverse[source] = position
        return a.transpose(inverse)


_AS_IS = {axis: Layout(None, axis) for axis in range(1, 8)}  # the common case, made once

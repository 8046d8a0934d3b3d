"""How the normalizations over groups (LayerNorm, GroupNorm, InstanceNorm) see their input.

Every one of them normalizes groups of values with the group's own mean and variance and then
applies a per-channel affine map; they differ only in which values form a group. A
:class:`GroupLayout` names that grouping for a contiguous array, and both backends implement
``group_forward`` / ``group_backward`` against it.
"""

from __future__ import annotations

from typing import NamedTuple


class GroupLayout(NamedTuple):
    """The grouping of a contiguous array.

    ``kind``:

    * ``"rows"``: an ``(n, c)`` array, one group per row, the affine map per column (LayerNorm);
    * ``"cf"``: ``(n, c, s)``, groups of ``k`` consecutive channels of one sample (GroupNorm;
      InstanceNorm is ``k = 1``);
    * ``"cl"``: ``(n, s, c)``, the same with the channels last.
    """

    kind: str
    n: int
    c: int
    s: int = 1
    k: int = 1

    @property
    def groups(self) -> int:
        """Number of groups (rows, or samples times channel groups)."""
        return self.n if self.kind == "rows" else self.n * (self.c // self.k)

    @property
    def size(self) -> int:
        """Values per group."""
        return self.c if self.kind == "rows" else self.k * self.s

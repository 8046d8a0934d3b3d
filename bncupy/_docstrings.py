"""Parameter descriptions written once and shared by every function or class that takes them.

:func:`parameters_from` fills the Parameters section of a numpydoc docstring from other
docstrings: one entry per parameter of the object's signature, in signature order, its own
entries first. ``batch_norm`` thus documents exactly the parameters of ``batch_norm_forward``
that it takes, without a second copy of their text.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_HEADER = re.compile(r"^(\S[^\n]*)\n-{3,}\n", re.M)
_ORDER = ["Parameters", "Attributes", "Methods", "Returns", "Yields", "Other Parameters",
          "Raises", "Warns", "See Also", "Notes", "References", "Examples"]


def _sections(doc: str | None) -> tuple[str, dict[str, str]]:
    """The text before the first section, and each section's body by its name."""
    doc = inspect.cleandoc(doc or "")
    headers = list(_HEADER.finditer(doc))
    ends = [h.start() for h in headers[1:]] + [len(doc)]
    return ((doc[:headers[0].start()] if headers else doc).strip(),
            {h.group(1): doc[h.end():end].strip("\n") for h, end in zip(headers, ends, strict=True)})


def _entries(body: str) -> dict[str, tuple[list[str], str, str]]:
    """``{name: (names, type, description)}`` of a Parameters section; an entry may name
    several parameters."""
    found: dict[str, tuple[list[str], str, str]] = {}
    for entry in re.split(r"\n(?=\S)", body.strip("\n")) if body.strip() else []:
        head, _, description = entry.partition("\n")
        names, _, kind = head.partition(" : ")
        group = [n.strip() for n in names.split(",")]
        for name in group:
            found[name] = (group, kind, description)
    return found


def _signature_names(obj: Any) -> list[str]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    return [name for name in inspect.signature(target).parameters if name != "self"]


def parameters_from(*sources: Any) -> Callable[[T], T]:
    """Decorate a function or class: its Parameters section gets an entry for every parameter
    of its signature, taken from its own docstring or else from the first of ``sources`` that
    documents it. An entry naming several parameters (``weight, bias : ...``) is kept whole
    where the signature takes them all, and otherwise narrowed to the ones it takes."""

    def decorate(obj: T) -> T:
        head, sections = _sections(obj.__doc__)
        known: dict[str, tuple[list[str], str, str]] = {}
        for doc in (obj.__doc__, *(s.__doc__ for s in sources)):
            for name, entry in _entries(_sections(doc)[1].get("Parameters", "")).items():
                known.setdefault(name, entry)
        names = _signature_names(obj)
        lines, done = [], set()
        for name in names:
            if name in done or name not in known:
                continue
            group, kind, description = known[name]
            taken = [n for n in group if n in names and n not in done]
            lines.append(", ".join(taken) + (f" : {kind}" if kind else ""))
            if description:
                lines.append(description)
            done.update(taken)
        sections["Parameters"] = "\n".join(lines)
        text = "\n\n".join([head] + [f"{name}\n{'-' * len(name)}\n{sections[name]}"
                                     for name in sorted(sections, key=_ORDER.index)])
        obj.__doc__ = text + "\n"
        return obj

    return decorate

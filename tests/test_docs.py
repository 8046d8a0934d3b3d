"""The API reference lists every public name once, and every public docstring's example runs.

The pages under ``docs/api/`` list names by hand (grouped as users look for them), so a name
added to ``bncupy.__all__`` or ``bncupy.torch.__all__`` fails here until a page lists it, and a
page that lists a name that does not exist fails too. Only files inside the repository are
read; ``bncupy.torch.__all__`` is read from the source, so this runs without torch.

The examples run as doctests with ``np`` (NumPy) and ``bn`` (bncupy) defined, as the API pages
say; those of ``bncupy.torch`` also have ``torch`` and ``bncupy`` and need torch installed. The
tox env ``docs`` builds the pages with numpydoc's validation, which checks that every
documented object has an Examples section.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import os
import re
from pathlib import Path

import numpy as np
import pytest

import bncupy

ROOT = Path(__file__).parents[1]
API_PAGES = sorted((ROOT / "docs" / "api").glob("*.rst"))
# The docs env exists to test the docs: there, what a test needs (torch) fails when missing.
REQUIRED = "docs" in os.environ.get("BNCUPY_REQUIRE", "").split(",")


def torch_all() -> list[str]:
    """``bncupy.torch.__all__``, read from its source (importing it needs torch)."""
    tree = ast.parse((ROOT / "bncupy" / "torch.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__"
                                                for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("bncupy/torch.py has no __all__")


PUBLIC = {"bncupy": list(bncupy.__all__), "bncupy.torch": torch_all()}


def listed_names() -> list[tuple[str, str, str]]:
    """``(page, module, name)`` for every entry of an ``autosummary`` on the API pages."""
    entries = []
    for page in API_PAGES:
        module = None
        in_autosummary = False
        for line in page.read_text(encoding="utf-8").splitlines():
            directive = re.match(r"\.\. (currentmodule|module|automodule)::\s*(\S+)", line)
            if directive:
                module = directive.group(2)
            if line.startswith(".. "):
                in_autosummary = line.startswith(".. autosummary::")
                continue
            if in_autosummary and line.startswith("   ") and not line.strip().startswith(":"):
                assert module is not None, f"{page.name}: an autosummary before any module"
                entries.append((page.name, module, line.strip()))
            elif line and not line.startswith(" "):
                in_autosummary = False
    return entries


def test_the_api_pages_list_every_public_name_once():
    assert API_PAGES, "docs/api/ has no pages"
    listed = [(module, name) for _, module, name in listed_names()]
    expected = [(module, name) for module, names in PUBLIC.items() for name in names]
    missing = sorted(set(expected) - set(listed))
    assert not missing, ("public names that no page under docs/api/ lists: "
                         + ", ".join(f"{m}.{n}" for m, n in missing))
    twice = sorted({entry for entry in listed if listed.count(entry) > 1})
    assert not twice, f"listed more than once: {twice}"


def test_the_api_pages_list_no_name_that_is_not_public():
    unknown = [f"{page}: {module}.{name}" for page, module, name in listed_names()
               if name not in PUBLIC.get(module, [])]
    assert not unknown, f"listed but not in the module's __all__: {unknown}"


def test_every_api_page_is_in_the_reference_toctree():
    index = (ROOT / "docs" / "api" / "index.rst").read_text(encoding="utf-8")
    pages = {page.stem for page in API_PAGES} - {"index"}
    assert {p for p in pages if not re.search(rf"^   {p}$", index, re.M)} == set()


def _own(member: object) -> bool:
    """Whether ``member`` (a function, property or class attribute) is bncupy's code."""
    target = member.fget if isinstance(member, property) else member
    return getattr(target, "__module__", "").startswith("bncupy")


def documented(module_name: str) -> list[tuple[str, object]]:
    """``(name, object)`` of a module's public names and of their public methods and
    properties (``__call__`` included), as the API pages show them."""
    module = importlib.import_module(module_name)
    found = []
    for name in PUBLIC[module_name]:
        obj = getattr(module, name)
        found.append((f"{module_name}.{name}", obj))
        if inspect.isclass(obj) and module_name == "bncupy":
            for attr in sorted(dir(obj)):
                if attr.startswith("_") and attr != "__call__" or attr == "extra_repr":
                    continue
                member = inspect.getattr_static(obj, attr)
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if _own(member) and (callable(member) or isinstance(member, property)):
                    found.append((f"{module_name}.{name}.{attr}", member))
    return found


def _run_examples(name: str, obj: object, globs: dict) -> None:
    text = inspect.getdoc(obj) or ""
    test = doctest.DocTestParser().get_doctest(text, dict(globs), name, None, 0)
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    with bncupy.use_backend("numpy"):  # the outputs shown are NumPy arrays
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


BNCUPY_OBJECTS = documented("bncupy")


@pytest.mark.parametrize(("name", "obj"), BNCUPY_OBJECTS, ids=[n for n, _ in BNCUPY_OBJECTS])
def test_docstring_example_runs(name, obj):
    _run_examples(name, obj, {"np": np, "bn": bncupy})


@pytest.mark.parametrize("name", PUBLIC["bncupy.torch"])
def test_torch_adapter_docstring_example_runs(name):
    try:
        torch = importlib.import_module("torch")
    except ImportError as exc:
        if REQUIRED:
            pytest.fail(f"BNCUPY_REQUIRE=docs, but torch is not installed: {exc}")
        pytest.skip(f"torch is not installed (the tox envs 'docs' and 'torch' run this): {exc}")
    adapter = importlib.import_module("bncupy.torch")
    _run_examples(f"bncupy.torch.{name}", getattr(adapter, name),
                  {"np": np, "bn": bncupy, "torch": torch, "bncupy": bncupy})


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_every_public_name_has_an_example(module):
    if module == "bncupy.torch":
        source = (ROOT / "bncupy" / "torch.py").read_text(encoding="utf-8")
        tree = ast.parse(source)
        docs = {node.name: ast.get_docstring(node) or "" for node in tree.body
                if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    else:
        docs = {name: inspect.getdoc(getattr(bncupy, name)) or "" for name in PUBLIC[module]}
    assert [name for name in PUBLIC[module] if ">>> " not in docs[name]] == []

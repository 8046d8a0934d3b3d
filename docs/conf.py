"""Sphinx configuration: pydata-sphinx-theme, numpydoc (with validation), autosummary, MyST."""

import bncupy

project = "bncupy"
author = "bncupy developers"
copyright = "bncupy developers"
release = version = bncupy.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "myst_parser",
]

templates_path = ["_templates"]
exclude_patterns = ["_build"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}

# One page per public name, generated from the docstrings at every build (never committed).
autosummary_generate = True
autodoc_typehints = "none"  # the docstrings' Parameters sections say it better than `Any`
autodoc_default_options = {"member-order": "bysource"}
# A class page's contents list "backward()", not "BatchNorm2d.backward()".
toc_object_entries_show_parents = "hide"

numpydoc_show_class_members = False
numpydoc_xref_param_type = False
# Every documented object is validated; the build (-W) fails on a gap. Left out: the project's
# docstring style (summary on the quotes' line GL01/GL02, noun-phrase summaries SS05, summaries
# over two lines SS06, a single return value named RT02) and optional sections (ES01, SA01).
numpydoc_validation_checks = {"all", "GL01", "GL02", "SS05", "SS06", "ES01", "SA01", "RT02"}

nitpicky = True  # a broken cross-reference is a warning, so an error

myst_heading_anchors = 3  # the README links to sections of the guide's pages

html_theme = "pydata_sphinx_theme"
html_title = f"bncupy {version}"
html_static_path = ["_static"]
html_favicon = "_static/favicon.svg"
html_css_files = ["bncupy.css"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
    # Pages use the full width for tables, signatures and code; only a class page keeps the
    # column on the right, listing its methods.
    "secondary_sidebar_items": {"index": [], "guide/*": [], "api/*": [],
                                "api/generated/bncupy.[a-z]*": [],
                                "api/generated/bncupy.[A-Z]*": ["page-toc"]},
}
html_context = {"default_mode": "auto"}  # follows the reader's light or dark preference

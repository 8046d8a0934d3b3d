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
toc_object_entries_show_parents = "hide"  # "backward()" in a page's contents, not "BatchNorm2d.backward()"

numpydoc_show_class_members = False
numpydoc_xref_param_type = False
# Every documented object is validated; the build (-W) fails on a gap. Left out: style choices
# of this project (summary on the quote line, noun-phrase summaries, several-line summaries),
# and the optional Extended Summary / See Also sections.
numpydoc_validation_checks = {"all", "GL01", "GL02", "SS05", "SS06", "ES01", "SA01", "RT02"}

# Broken cross-references are errors too; these name types of other libraries (no network to
# fetch their inventories) or plain words in type descriptions.
nitpicky = True
nitpick_ignore_regex = []

myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

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
    # Pages use the full width for tables, signatures and code; a guide page's sections are in
    # the navigation bar on the left, a class page's methods in a column on the right.
    "secondary_sidebar_items": {"index": [], "guide/*": [], "api/*": [],
                                "api/generated/bncupy.[a-z]*": [],
                                "api/generated/bncupy.[A-Z]*": ["page-toc"]},
}
html_context = {"default_mode": "auto"}  # follows the reader's light or dark preference

"""Sphinx configuration of the pyro_scoreflow documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` from the repository root
(``tests/test_docs.py`` runs exactly that, warnings as errors).
"""

from __future__ import annotations

import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # document this checkout even when the package is not installed

import pyro_scoreflow  # noqa: E402

project = "pyro_scoreflow"
author = "pyro_scoreflow developers"
copyright = "pyro_scoreflow developers"
version = release = pyro_scoreflow.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: $...$ / $$...$$ maths in the Markdown pages, ```{directive} blocks, anchors for ## and ### headings
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc: members in source order, signatures without the type-hint noise, hints in the descriptions
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False

html_theme = "furo"
html_title = f"pyro_scoreflow {release}"
html_static_path = ["_static"]

# Pages written by other people that may not exist yet in a checkout (the index lists them all).
# A toctree entry naming a missing page is a warning, i.e. an error under -W, so the index is
# rewritten on reading to drop the entries whose file is absent. Everything else stays strict.
OPTIONAL_PAGES = ("inference", "posterior", "benchmarks", "distributed", "pretrained")


def _drop_missing_pages(app, docname: str, source: list[str]) -> None:
    if docname != root_doc:
        return
    here = os.path.dirname(__file__)
    for name in OPTIONAL_PAGES:
        if not any(os.path.exists(os.path.join(here, name + ext)) for ext in (".md", ".rst")):
            source[0] = re.sub(rf"^{name}\n", "", source[0], flags=re.MULTILINE)


# The package's docstrings end with plain-text reference lists, one "[n] authors, title" entry per
# reference, continuation lines indented, entries not separated by blank lines (readable in help()).
# reST would read each entry as a definition-list item, and a one-line entry after a multi-line one
# as a malformed list (a warning). Render each entry as its own paragraph instead.
_REFERENCE = re.compile(r"^\[\d+\] ")


def _reference_paragraphs(app, what, name, obj, options, lines: list[str]) -> None:
    out: list[str] = []
    in_ref = False
    for line in lines:
        if _REFERENCE.match(line):
            if out and out[-1].strip():
                out.append("")
            out.append(line)
            in_ref = True
        elif in_ref and line.startswith(" ") and line.strip():
            out[-1] += " " + line.strip()
        else:
            in_ref = False
            out.append(line)
    lines[:] = out


def _reread_index(app, env, added, changed, removed) -> list[str]:
    return [root_doc]  # so an incremental build notices an optional page that appeared or went away


def setup(app) -> None:
    app.connect("source-read", _drop_missing_pages)
    app.connect("env-get-outdated", _reread_index)
    app.connect("autodoc-process-docstring", _reference_paragraphs)

"""Sphinx configuration of the pyro_scoreflow documentation.

Build with ``python -m sphinx -W -b html docs docs/_build/html`` from the repository root
(``tests/test_docs.py`` runs that, warnings as errors, in the slow test stage).

The API reference is generated here, one page per public module (``API_MODULES``): adding, removing or
renaming a module is one edit of that list. Maths is typeset by a MathJax bundled with the
``sphinx-mathjax-offline`` package, so the built pages render formulas with no network.
"""

from __future__ import annotations

import importlib
import inspect
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
    # MathJax 3 and its fonts copied into _static/mathjax: formulas render offline (no CDN)
    "sphinx-mathjax-offline",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

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
html_css_files = ["custom.css"]  # wide tables scroll instead of being cut off

# -- API reference: one page per public module ---------------------------------------------------------------------
# (module, page title). The page lists the module's ``__all__`` in a summary table, then documents each name.
# To add a module, add a line; to rename one, edit its line.
API_MODULES = [
    ("pyro_scoreflow.distribution", "The distribution: ScoreSDEPrior"),
    ("pyro_scoreflow.sde", "Forward SDEs"),
    ("pyro_scoreflow.scores", "Score models"),
    ("pyro_scoreflow.networks", "Score networks"),
    ("pyro_scoreflow.conditional", "Conditional priors"),
    ("pyro_scoreflow.transforms", "The probability-flow transform"),
    ("pyro_scoreflow.samplers", "Samplers"),
    ("pyro_scoreflow.options", "Solver options"),
    ("pyro_scoreflow.infer", "Inference: posterior sampling"),
    ("pyro_scoreflow.infer.smc", "Twisted sequential Monte Carlo"),
    ("pyro_scoreflow.infer.surrogate", "The mixture-surrogate twist of DiffusionSMC"),
    ("pyro_scoreflow.infer.reparam", "Latent-space reparameterization"),
    ("pyro_scoreflow.training", "Training"),
    ("pyro_scoreflow.losses", "Losses: denoising score matching"),
    ("pyro_scoreflow.checkpoint", "Checkpoints"),
    ("pyro_scoreflow.datasets", "Data sets"),
    ("pyro_scoreflow.metrics", "Metrics"),
    ("pyro_scoreflow.distributed", "Distributed training"),
    ("pyro_scoreflow.dynamics", "Vector fields and solvers"),
    ("pyro_scoreflow.compiled", "Compiled log-density"),
    ("pyro_scoreflow.cli", "Command line"),
    ("pyro_scoreflow.commands", "Command-line commands"),
    ("pyro_scoreflow.demo", "The demo"),
    ("pyro_scoreflow.plotting", "Plotting (optional: the plots extra)"),
]
API_DIR = "api"  # generated pages: docs/api/*.rst (not in git)

# Pages written by other people that may not exist yet in a checkout (the index lists them all).
# A toctree entry naming a missing page is a warning, i.e. an error under -W, so the index is
# rewritten on reading to drop the entries whose file is absent. Everything else stays strict.
OPTIONAL_PAGES = ("inference", "posterior", "benchmarks", "benchmarks_posterior", "distributed", "pretrained")


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


def _summary(obj) -> str:
    """The first paragraph of ``obj``'s docstring, on one line (reST markup kept)."""
    doc = inspect.getdoc(obj) or ""
    summary = " ".join(doc.split("\n\n")[0].split())
    if summary.endswith(":"):  # a sentence introducing a display equation
        summary = summary[:-1] + "."
    return summary or "\\"


def _public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
        ]
    return [n for n in names if n != "__version__"]


def _summary_table(rows: list[tuple[str, str]]) -> str:
    if not rows:
        return ""
    lines = [".. list-table::", "   :class: api-summary", "   :widths: 30 70", ""]
    for target, summary in rows:
        lines += [f"   * - :py:obj:`~{target}`", f"     - {summary}"]
    return "\n".join(lines) + "\n"


def _write_if_changed(path: str, text: str) -> None:
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
    if old != text:  # keep mtimes, so incremental builds stay incremental
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)


def generate_api_pages(app) -> None:
    """Write ``docs/api/index.rst`` and one ``docs/api/<module>.rst`` per entry of ``API_MODULES``."""
    here = os.path.dirname(__file__)
    out = os.path.join(here, API_DIR)
    os.makedirs(out, exist_ok=True)
    documented: dict[int, str] = {}  # id(object) -> its documented dotted name
    pages = []
    for modname, title in API_MODULES:
        module = importlib.import_module(modname)
        rows = []
        for name in _public_names(module):
            obj = getattr(module, name)
            documented.setdefault(id(obj), f"{modname}.{name}")
            if inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj):
                rows.append((f"{modname}.{name}", _summary(obj)))
        heading = f"{title} (``{modname}``)"
        body = [
            heading,
            "=" * len(heading),
            "",
            f".. currentmodule:: {modname}",
            "",
            _summary_table(rows),
            f".. automodule:: {modname}",
            "   :members:",
            "",
        ]
        pages.append(modname)
        _write_if_changed(os.path.join(out, modname + ".rst"), "\n".join(body))
    # the package's top level: a table of the re-exported names, each linked to where it is documented
    top = importlib.import_module("pyro_scoreflow")
    rows = []
    for name in _public_names(top):
        obj = getattr(top, name)
        if id(obj) in documented:
            rows.append((documented[id(obj)], _summary(obj)))
    index = (
        [
            "API reference",
            "=============",
            "",
            "Generated from the docstrings, one page per public module. The binding public API (names, shapes,",
            "behaviours that will not change without a deprecation) is the package's top level below, plus",
            "``pyro_scoreflow.infer``, ``pyro_scoreflow.datasets.load`` and the checkpoint functions; the rest",
            "documents the machinery underneath.",
            "",
            "``pyro_scoreflow``: the top level",
            "---------------------------------",
            "",
            ".. automodule:: pyro_scoreflow",
            "",
            _summary_table(rows),
            "Modules",
            "-------",
            "",
            ".. toctree::",
            "   :maxdepth: 1",
            "",
        ]
        + [f"   {m}" for m in pages]
        + [""]
    )
    _write_if_changed(os.path.join(out, "index.rst"), "\n".join(index))
    for stale in os.listdir(out):  # a module removed from API_MODULES loses its page
        if stale.endswith(".rst") and stale[:-4] not in pages and stale != "index.rst":
            os.remove(os.path.join(out, stale))


def _public_bases(app, name, obj, options, bases: list) -> None:
    """Show public classes only under "Bases:": a private base is replaced by its own (public) bases."""

    def expand(cls) -> list:
        if cls.__name__.startswith("_"):
            return [b for base in cls.__bases__ for b in expand(base)]
        return [cls]

    new = []
    for base in bases:
        for b in expand(base) if inspect.isclass(base) else [base]:
            if b not in new:
                new.append(b)
    bases[:] = new


def _strip_included_blank_lines(app, doctree) -> None:
    """Drop the blank lines that ``literalinclude`` keeps before an ``# [end-...]`` marker of an example."""
    from docutils import nodes

    for block in doctree.findall(nodes.literal_block):
        text = block.astext()
        if block.get("source", "").endswith(".py") and text != text.rstrip("\n"):
            block.rawsource = text.rstrip("\n")  # rawsource == text, else the HTML writer skips highlighting
            block.children = [nodes.Text(block.rawsource)]


def _reread_index(app, env, added, changed, removed) -> list[str]:
    return [root_doc]  # so an incremental build notices an optional page that appeared or went away


def setup(app) -> None:
    app.connect("builder-inited", generate_api_pages)
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("doctree-read", _strip_included_blank_lines)
    # load MathJax on every page, not only on pages with equations: headings with maths appear in every
    # page's navigation sidebar
    app.set_html_assets_policy("always")
    app.connect("source-read", _drop_missing_pages)
    app.connect("env-get-outdated", _reread_index)
    app.connect("autodoc-process-docstring", _reference_paragraphs)

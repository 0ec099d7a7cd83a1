"""The documentation: the README's example runs, every tutorial page shows its whole script, the docs build
strictly (every warning is an error), the API reference has a page per module, and the maths renders offline.

The fast tests need no Sphinx. The build tests are slow (the second CI stage, ``python -m pytest -q -m slow``);
the rendering check also needs Chromium and skips without it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"
HAS_SPHINX = importlib.util.find_spec("sphinx") is not None
INCLUDE = re.compile(
    r"```\{literalinclude\}\s+(?P<path>\S+)\n(?P<options>(?::[^\n]*\n)*)```",
)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    return env


# -- the README ------------------------------------------------------------------------------------------------------
def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def test_readme_example_runs_and_prints_a_result(tmp_path: Path) -> None:
    """The README's 30-second example is copied verbatim, run as a script, and must print its result."""
    blocks = readme_python_blocks()
    assert blocks, "README.md has no ```python block"
    script = tmp_path / "readme_example.py"
    script.write_text(blocks[0], encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"README example failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "posterior mean" in result.stdout, f"README example printed no result:\n{result.stdout}"


# -- tutorials show their code ---------------------------------------------------------------------------------------
def _includes(page: Path) -> list[tuple[Path, str, str]]:
    """(example file, start marker, end marker) of every ``literalinclude`` on a Markdown page."""
    found = []
    for match in INCLUDE.finditer(page.read_text(encoding="utf-8")):
        options = dict(re.findall(r"^:([\w-]+):\s*(.*)$", match["options"], flags=re.MULTILINE))
        start = options.get("start-after", "").strip('"')
        end = options.get("end-before", "").strip('"')
        found.append(((page.parent / match["path"]).resolve(), start, end))
    return found


def _code_lines(source: str) -> set[int]:
    """Line numbers (0-based) of the non-blank lines after the module docstring."""
    tree = ast.parse(source)
    first = 0
    if (
        tree.body
        and isinstance(tree.body[0], ast.Expr)
        and isinstance(getattr(tree.body[0], "value", None), ast.Constant)
    ):
        first = tree.body[0].end_lineno
    return {i for i, line in enumerate(source.split("\n")) if i >= first and line.strip()}


TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))


@pytest.mark.parametrize("page", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_page_includes_its_whole_script(page: Path) -> None:
    """Each tutorial includes marked sections of ``examples/<name>.py`` that together cover the whole script."""
    example = EXAMPLES / f"{page.stem}.py"
    assert example.is_file(), f"{page.name} has no script {example.name}"
    includes = _includes(page)
    assert includes, f"{page.name} includes no code"
    source = example.read_text(encoding="utf-8")
    lines = source.split("\n")
    covered: set[int] = set()
    for path, start, end in includes:
        assert path == example.resolve(), f"{page.name} includes {path}, expected {example}"
        assert start and end, f"{page.name}: every literalinclude needs :start-after: and :end-before:"
        starts = [i for i, line in enumerate(lines) if start in line]
        ends = [i for i, line in enumerate(lines) if end in line]
        assert len(starts) == 1 and len(ends) == 1, f"{example.name}: markers {start!r} / {end!r} must occur once"
        assert starts[0] < ends[0], f"{example.name}: {start!r} after {end!r}"
        covered.update(range(starts[0], ends[0] + 1))
    missing = sorted(_code_lines(source) - covered)
    assert not missing, f"{page.name} does not show lines {[m + 1 for m in missing][:10]} of {example.name}"


def test_every_example_has_a_tutorial_page() -> None:
    pages = {p.stem for p in TUTORIALS}
    for example in EXAMPLES.glob("*.py"):
        assert example.stem in pages, f"examples/{example.name} has no docs/tutorials/{example.stem}.md"


# -- the Sphinx build ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built_docs(tmp_path_factory) -> Path:
    """``python -m sphinx -W -b html docs <tmp>``: every warning fails the build."""
    out = tmp_path_factory.mktemp("docs") / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"sphinx build failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return out


needs_sphinx = pytest.mark.skipif(
    not HAS_SPHINX, reason="the docs build needs Sphinx: pip install -e '.[test]' (or '.[docs]')"
)


# Only a missing Sphinx skips: with Sphinx present, a missing extension (myst-parser, furo, sphinx-mathjax-offline)
# is a broken docs environment and fails the build with Sphinx's own message.
@pytest.mark.slow
@needs_sphinx
def test_docs_build_without_warnings(built_docs: Path) -> None:
    assert (built_docs / "index.html").is_file()
    for page in TUTORIALS:
        html = (built_docs / "tutorials" / f"{page.stem}.html").read_text(encoding="utf-8")
        assert html.count('<div class="highlight-python') >= 3, f"tutorial {page.stem} shows no highlighted code"
    assert (built_docs / "_static" / "mathjax" / "tex-chtml.js").is_file(), "MathJax is not bundled"


@pytest.mark.slow
@needs_sphinx
def test_api_reference_has_a_page_per_module(built_docs: Path) -> None:
    sys.path.insert(0, str(DOCS))
    try:
        conf = importlib.import_module("conf")
    finally:
        sys.path.remove(str(DOCS))
    index = (built_docs / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("ScoreSDEPrior", "GaussianMixtureScore", "VPSDE", "fit"):
        assert name in index, f"{name} missing from the API summary"
    for modname, _ in conf.API_MODULES:
        page = built_docs / "api" / f"{modname}.html"
        assert page.is_file(), f"no API page for {modname}"
        html = page.read_text(encoding="utf-8")
        assert "api-summary" in html, f"{modname}: no summary table"
        module = importlib.import_module(modname)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isroutine(obj):  # data needs a doc comment to be documented
                assert f'id="{modname}.{name}"' in html, f"{modname}.{name} is not documented on its page"
    distribution = (built_docs / "api" / "pyro_scoreflow.distribution.html").read_text(encoding="utf-8")
    for name in ("log_prob_lower_bound", "sample_and_log_prob", "from_pretrained"):
        assert name in distribution, f"ScoreSDEPrior.{name} missing from the API reference"
    sde = (built_docs / "api" / "pyro_scoreflow.sde.html").read_text(encoding="utf-8")
    assert "_BetaSchedule" not in sde, "a private base class is shown in the API reference"


@pytest.mark.slow
@needs_sphinx
def test_maths_renders_offline_in_headless_chromium(built_docs: Path, tmp_path: Path) -> None:
    """The built pages typeset every formula with the bundled MathJax while all network access is blocked."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        check = importlib.import_module("check_docs_math")
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    chromium = check.find_chromium()
    if chromium is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium, or set $CHROMIUM)")
    for name in check.DEFAULT_PAGES:
        dom = check.render(chromium, built_docs / name, tmp_path / "shot.png" if name == "math.html" else None)
        assert check.count_typeset(dom) > 0, f"{name}: no formula typeset"
        assert check.check_dom(dom) == [], f"{name}: {check.check_dom(dom)}"
    assert (tmp_path / "shot.png").stat().st_size > 10_000, "the screenshot is empty"

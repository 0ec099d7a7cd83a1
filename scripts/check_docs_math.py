r"""Check that the built documentation typesets its maths with no network, in headless Chromium.

The docs bundle MathJax (``sphinx-mathjax-offline``), so a page opened from disk must render every
formula without reaching a CDN. This script loads pages of a built HTML tree from ``file://`` in
headless Chromium with all network access blocked (every host name resolves to nothing, every
request goes to a closed local proxy), lets the page's scripts run, and checks the resulting DOM:

* every ``<span class="math">`` / ``<div class="math">`` that Sphinx wrote holds a MathJax
  ``<mjx-container>`` (the formula was typeset);
* no MathJax error element (``<mjx-merror>``) is present;
* no raw TeX delimiter (``\(``, ``\)``, ``\[``, ``\]``, ``$$``) is left in the visible text (code
  blocks excepted), including headings and the navigation sidebar;
* the page loads no script from the network.

It also saves a screenshot of the first page, to look at.

Usage (from the repository root; needs ``chromium`` or ``google-chrome`` on the PATH, or ``$CHROMIUM``)::

    python scripts/check_docs_math.py --build --screenshot math.png        # build the docs, then check
    python scripts/check_docs_math.py --html docs/_build/html math.html benchmarks.html

Exit status 0 when every page passes, 1 when one fails, 2 when no Chromium is found.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PAGES = ("math.html", "posterior.html", "benchmarks.html", "api/pyro_scoreflow.sde.html")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
SKIP_TEXT = {"script", "style", "pre", "code", "textarea", "mjx-assistive-mml", "noscript"}


def find_chromium() -> str | None:
    """The Chromium executable: ``$CHROMIUM`` if set, else the first of ``BROWSERS`` on the PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def build_docs(out: Path) -> None:
    """``python -m sphinx -W -b html docs <out>``; raises ``RuntimeError`` with Sphinx's output on failure."""
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(ROOT / "docs"), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"sphinx build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")


def chromium_flags(profile: str) -> list[str]:
    """Headless, sandbox-free (containers run as root), and with every network request blocked."""
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-extensions",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--mute-audio",
        f"--user-data-dir={profile}",
        # no network: names resolve to nothing, and any request would go to a closed local port
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=127.0.0.1:9",
        "--allow-file-access-from-files",
        # let scripts run (MathJax typesets asynchronously) before the DOM is dumped / the shot is taken
        "--virtual-time-budget=20000",
        "--window-size=1280,1600",
    ]


def render(chromium: str, page: Path, screenshot: Path | None = None, timeout: float = 120.0) -> str:
    """The DOM of ``page`` after its scripts ran, and optionally a PNG screenshot of it."""
    with tempfile.TemporaryDirectory(prefix="pyro_scoreflow_chromium_") as profile:
        url = page.resolve().as_uri()
        dom = subprocess.run(
            [chromium, *chromium_flags(profile), "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if dom.returncode != 0 or not dom.stdout.strip():
            raise RuntimeError(f"chromium failed on {page} (exit {dom.returncode}):\n{dom.stderr[-3000:]}")
        if screenshot is not None:
            shot = subprocess.run(
                [chromium, *chromium_flags(profile), f"--screenshot={screenshot.resolve()}", url],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if shot.returncode != 0 or not screenshot.is_file():
                raise RuntimeError(f"chromium could not take a screenshot of {page}:\n{shot.stderr[-3000:]}")
    return dom.stdout


class _MathAudit(HTMLParser):
    """Counts Sphinx's math elements, those typeset by MathJax, MathJax errors, and raw TeX in visible text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[list] = []  # [tag, is_math, saw_mjx]
        self.math = 0
        self.typeset = 0
        self.errors = 0
        self.raw: list[str] = []
        self.network_scripts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        if tag == "script" and re.match(r"(https?:)?//", attributes.get("src") or ""):
            self.network_scripts.append(attributes["src"])
        if tag == "mjx-merror":
            self.errors += 1
        if tag == "mjx-container":
            for entry in self.stack:
                entry[2] = True
        if tag in VOID:
            return
        classes = (attributes.get("class") or "").split()
        is_math = tag in ("span", "div") and "math" in classes
        self.math += is_math
        self.stack.append([tag, is_math, False])

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID and self.stack and self.stack[-1][0] == tag:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                for entry in self.stack[i:]:
                    if entry[1] and entry[2]:
                        self.typeset += 1
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        if any(entry[0] in SKIP_TEXT for entry in self.stack):
            return
        for match in RAW_TEX.finditer(data):
            self.raw.append(data[max(0, match.start() - 40) : match.end() + 40].strip())


def check_dom(dom: str) -> list[str]:
    """The problems found in a rendered DOM (empty when the maths was typeset offline)."""
    audit = _MathAudit()
    audit.feed(dom)
    audit.close()
    problems = []
    if audit.network_scripts:
        problems.append(f"scripts loaded from the network: {audit.network_scripts}")
    if audit.math and audit.typeset < audit.math:
        problems.append(f"{audit.math - audit.typeset} of {audit.math} math elements were not typeset by MathJax")
    if audit.errors:
        problems.append(f"{audit.errors} MathJax error element(s) (mjx-merror)")
    if audit.raw:
        problems.append(f"{len(audit.raw)} raw TeX delimiter(s) left in the text, e.g. {audit.raw[:3]}")
    return problems


def count_typeset(dom: str) -> int:
    return dom.count("<mjx-container")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", default=list(DEFAULT_PAGES), help="pages, relative to the HTML tree")
    parser.add_argument("--html", type=Path, default=None, help="a built HTML tree (default: build one)")
    parser.add_argument("--build", action="store_true", help="build the docs first (into --html or a temporary folder)")
    parser.add_argument("--screenshot", type=Path, default=None, help="save a PNG of the first page here")
    args = parser.parse_args(argv)

    chromium = find_chromium()
    if chromium is None:
        print("no Chromium found: install chromium (apt-get install chromium) or set $CHROMIUM", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pyro_scoreflow_docs_") as tmp:
        html = args.html or Path(tmp) / "html"
        if args.build or args.html is None:
            print(f"building the docs into {html} ...", file=sys.stderr)
            build_docs(html)
        failed = 0
        for i, name in enumerate(args.pages):
            page = html / name
            if not page.is_file():
                print(f"FAIL {name}: no such page in {html}")
                failed += 1
                continue
            dom = render(chromium, page, args.screenshot if i == 0 else None)
            problems = check_dom(dom)
            status = "FAIL" if problems else "ok  "
            details = "".join(f"\n     {p}" for p in problems)
            print(f"{status} {name}: {count_typeset(dom)} formulas typeset offline{details}")
            failed += bool(problems)
        if args.screenshot is not None and args.screenshot.is_file():
            print(f"screenshot of {args.pages[0]}: {args.screenshot}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

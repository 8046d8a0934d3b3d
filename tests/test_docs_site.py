"""The built documentation in a real browser: Debian's Chromium, driven by Playwright.

Runs where ``BNCUPY_DOCS_HTML`` names the output of ``sphinx-build -b html`` (the tox env
``docs`` builds it first). There (``BNCUPY_REQUIRE=docs``) a missing build, Chromium or
Playwright fails the tests instead of skipping them. ``BNCUPY_DOCS_SCREENSHOTS=DIR`` keeps
screenshots of the index and of the page for ``bncupy.batch_norm``.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REQUIRED = "docs" in os.environ.get("BNCUPY_REQUIRE", "").split(",")


def _missing(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"BNCUPY_REQUIRE=docs, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def html() -> Path:
    """The built site."""
    where = os.environ.get("BNCUPY_DOCS_HTML")
    if not where:
        _missing("BNCUPY_DOCS_HTML is not set: build the docs with `tox -e docs`")
    site = Path(where)
    if not (site / "index.html").exists():
        _missing(f"{site} holds no built site (index.html)")
    return site


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.ids.update(value for name, value in attrs if name == "id" and value)


def _ids(page: Path) -> set[str]:
    parser = _Ids()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.ids


def test_every_readme_link_into_the_docs_resolves_in_the_built_site(html):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", readme)
    assert len(links) >= 9
    for target, anchor in links:
        page = html / Path(target).relative_to("docs").with_suffix(".html")
        assert page.exists(), f"README links {target}, but the build has no {page.name}"
        if anchor:
            assert anchor in _ids(page), f"README links {target}#{anchor}: no such anchor"


def test_every_readme_link_to_a_file_resolves_in_the_repository():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s:]+)(?:#[^)\s]*)?\)", readme):
        assert (ROOT / target).exists(), f"README links {target}, which does not exist"


@pytest.fixture(scope="module")
def site(html):
    """The built site served over HTTP on the loopback interface, as a host would serve it
    (search fetches pages, which browsers refuse for file:// URLs)."""
    handler = functools.partial(_QuietHandler, directory=str(html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} is missing: install Debian's chromium package "
                 "(the tox env docs does: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _missing(f"playwright is not installed: {exc}")
    with sync_playwright() as playwright:  # each launch gets a fresh temporary profile
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400
            else None)
    yield page
    page.close()
    assert problems == [], "\n".join(problems)


def _screenshot(page, name: str) -> None:
    folder = os.environ.get("BNCUPY_DOCS_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name), full_page=True)


def test_index_renders_with_the_guide_and_the_reference(site, page):
    page.goto(f"{site}/index.html")
    assert page.title().startswith("bncupy")
    assert page.locator("h1").first.inner_text().strip().startswith("bncupy")
    nav = page.locator(".bd-header").inner_text()
    assert "User guide" in nav and "API reference" in nav
    _screenshot(page, "index.png")


def test_api_page_renders_signature_parameters_and_example(site, page):
    page.goto(f"{site}/api/generated/bncupy.batch_norm.html")
    signature = page.locator("dt.sig").first.inner_text()
    assert "bncupy.batch_norm(" in signature.replace("\n", "")
    body = page.locator("article").inner_text()
    for heading in ("Parameters", "Returns", "Examples"):
        assert heading in body, f"{heading} missing from the batch_norm page"
    for name in ("running_mean", "momentum", "residual"):
        assert name in body
    assert page.locator("div.doctest, div.highlight-pycon, .highlight-default").count() >= 1
    _screenshot(page, "api-batch_norm.png")


def test_search_finds_layer_norm(site, page):
    page.goto(f"{site}/index.html")
    page.keyboard.press("Control+k")  # pydata-sphinx-theme's search shortcut opens the box
    box = page.locator("input[name='q']:visible").first
    box.fill("layer_norm")
    box.press("Enter")
    page.wait_for_url(re.compile(r"search\.html\?q=layer_norm"))
    results = page.locator("#search-results li")
    results.first.wait_for(timeout=30_000)
    titles = " ".join(results.all_inner_texts())
    assert "bncupy.layer_norm" in titles

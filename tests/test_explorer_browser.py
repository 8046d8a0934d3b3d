"""explorer.html in a real browser: Debian's Chromium, driven by Playwright.

Runs where ``BNCUPY_BROWSER_TEST=1`` (the tox ``browser`` env, which installs Chromium with apt);
there, a missing Chromium or Playwright fails the test instead of skipping it. Set
``BNCUPY_SCREENSHOT=path.png`` to keep the screenshot (the README's comes from here).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(os.environ.get("BNCUPY_BROWSER_TEST") != "1",
                                reason="browser test: run `tox -e browser` "
                                       "(or set BNCUPY_BROWSER_TEST=1 with Chromium installed)")


@pytest.fixture(scope="module")
def explorer_page(tmp_path_factory):
    """The explorer page of a real ``bncupy demo --quick`` run."""
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "bncupy", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return out / "explorer.html"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package "
                    "(the tox browser env does: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.fail(f"playwright is not installed: {exc}")
    with sync_playwright() as playwright:  # each launch gets a fresh temporary profile
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield instance
        instance.close()


def number(page, selector: str) -> float:
    return float(page.text_content(selector))


def column(page, stage: str, feature: int) -> list[str]:
    return [page.text_content(f"#cell-{stage}-{row}-{feature}") for row in range(8)]


def assert_training_statistics(page, feature: int) -> None:
    """What training-mode batch norm guarantees, read off the page."""
    assert abs(number(page, f"#stat-normalized-mean-{feature}")) <= 0.0005
    assert abs(number(page, f"#stat-normalized-var-{feature}") - 1) <= 0.0005
    beta = number(page, f"#beta-{feature}-value")
    gamma = number(page, f"#gamma-{feature}-value")
    assert abs(number(page, f"#stat-output-mean-{feature}") - beta) <= 0.0005
    assert abs(number(page, f"#stat-output-std-{feature}") - gamma) <= 0.0005 * gamma + 0.0005


def test_explorer_in_chromium(browser, explorer_page, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    requests, problems = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.goto(explorer_page.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)

    # everything inline: the page asks for nothing but itself (data: URLs are not requests)
    assert [url for url in requests if not url.startswith("data:")] == [explorer_page.as_uri()]
    assert page.evaluate("document.getElementById('curves').naturalWidth") > 500
    for feature in range(4):
        assert_training_statistics(page, feature)

    # gamma of F0 one notch and then another to the right: the output scales, x-hat stays
    normalized = column(page, "normalized", 0)
    gamma = number(page, "#gamma-0-value")
    page.focus("#gamma-0")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    new_gamma = number(page, "#gamma-0-value")
    assert new_gamma > gamma
    assert column(page, "normalized", 0) == normalized
    beta = number(page, "#beta-0-value")
    for xhat, y in zip(normalized, column(page, "output", 0), strict=True):
        assert abs(float(y) - (new_gamma * float(xhat) + beta)) <= 0.006 * new_gamma + 0.006
    assert_training_statistics(page, 0)

    # beta of F2 to its lowest value: the output mean follows
    page.focus("#beta-2")
    page.keyboard.press("Home")
    assert number(page, "#beta-2-value") == -4.0
    assert_training_statistics(page, 2)

    # F1 from uniform to bimodal: a different input batch and histogram, still normalized
    before = column(page, "input", 1), page.inner_html("#hist-input-1")
    page.select_option("#kind-1", label="bimodal")
    assert (column(page, "input", 1), page.inner_html("#hist-input-1")) != before
    assert "bimodal" in page.text_content("#caption-input-1")
    assert_training_statistics(page, 1)

    # F3's mean to the top of its slider: the input moves, x-hat does not (batch statistics)
    normalized = column(page, "normalized", 3)
    page.focus("#mean-3")
    page.keyboard.press("End")
    assert number(page, "#mean-3-value") == 50.0
    assert abs(number(page, "#stat-input-mean-3") - 50) < 1
    assert column(page, "normalized", 3) == normalized
    assert_training_statistics(page, 3)
    screenshot = tmp_path / "explorer.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("BNCUPY_SCREENSHOT"):  # the README's: controls, tables, histograms
        box = page.locator("#histograms").bounding_box()
        page.screenshot(path=os.environ["BNCUPY_SCREENSHOT"], full_page=True,
                        clip={"x": 0, "y": 0, "width": 1280, "height": box["y"] + box["height"] + 12})

    # inference after one batch: running mean a tenth of the way to 50, x-hat far off
    page.check("#mode-inference")
    assert page.text_content("#batches-value") == "1"
    assert 4 < number(page, "#running-mean-3") < 6
    off = number(page, "#stat-normalized-mean-3")
    assert off > 5
    gamma, beta = number(page, "#gamma-3-value"), number(page, "#beta-3-value")
    assert abs(number(page, "#stat-output-mean-3") - (gamma * off + beta)) <= 0.002 * abs(off)
    # ... and after 100 batches the running statistics have caught up
    page.focus("#batches")
    page.keyboard.press("End")
    assert page.text_content("#batches-value") == "100"
    assert abs(number(page, "#running-mean-3") - 50) < 1
    assert abs(number(page, "#stat-normalized-mean-3")) < 0.5
    assert 0.5 < number(page, "#stat-normalized-var-3") < 2

    # back to training: batch statistics again
    page.check("#mode-training")
    for feature in range(4):
        assert_training_statistics(page, feature)
    assert problems == []
    page.close()

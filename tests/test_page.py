"""The page `unirec serve` serves at /, in a real browser: headless Chromium (Debian's package) driven
through Playwright's Python package: pick a user -> see titled recommendations -> dismiss one -> the
list changes; then search a title and add it to the history; then an item added through the API
(POST /v1/items) is found, tagged new, and viewed. Saves screenshots.

Skips, saying why, when chromium or playwright is missing, unless UNIREC_REQUIRE_BROWSER=1 (CI sets it,
so there it fails instead). The browser binary: $UNIREC_CHROMIUM, else chromium on PATH.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from unirec.cli import main  # noqa: E402

from conftest import SYNTHETIC, TINY_MODEL  # noqa: E402
from test_serving import _call, _free_port, _start  # noqa: E402


def _browser():
    """(playwright's sync_playwright, chromium path), or skip / fail saying what is missing."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        missing.append("the playwright Python package (pip install playwright)")
    exe = os.environ.get("UNIREC_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        missing.append("a chromium binary (apt-get install chromium, or set UNIREC_CHROMIUM)")
    if missing:
        msg = "browser test needs " + " and ".join(missing)
        if os.environ.get("UNIREC_REQUIRE_BROWSER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return sync_playwright, exe


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    sync_playwright, exe = _browser()
    root = tmp_path_factory.mktemp("page")
    run = root / "run"
    assert main(["train", *SYNTHETIC, *TINY_MODEL, "--epochs", "1", "--out", str(run)]) == 0
    port = _free_port()
    proc = _start(run, root / "state", port)
    try:
        yield f"http://127.0.0.1:{port}", port, sync_playwright, exe
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _rec_ids(page):
    return page.eval_on_selector_all("#recs li", "els => els.map(e => e.dataset.itemId)")


def test_pick_user_dismiss_and_search_in_chromium(server, tmp_path):
    url, port, sync_playwright, exe = server
    shots = Path(os.environ.get("UNIREC_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('user').value !== ''")
            page.fill("#user", "u3")
            page.click("#load")
            page.wait_for_selector("#recs li")
            before = _rec_ids(page)
            assert len(before) == 10
            titles = page.eval_on_selector_all("#recs li .title", "els => els.map(e => e.textContent)")
            st, api = _call(port, "POST", "/v1/recommend", {"user_id": "u3", "k": 10})
            assert [x["item_id"] for x in api["items"]] == before
            assert titles == [x["title"] for x in api["items"]] and all(titles)  # the data set's titles
            first = before[0]
            page.click(f'#recs li[data-item-id="{first}"] button.dismiss')
            page.wait_for_function(f"!Array.from(document.querySelectorAll('#recs li')).some("
                                   f"e => e.dataset.itemId === {first!r})")
            after = _rec_ids(page)
            assert first not in after and after != before and len(after) == 10
            assert "dismiss" in page.inner_text("#status")
            page.screenshot(path=str(shots / "page-after-dismiss.png"), full_page=True)
            # search a title and add it to the history: it shows there and leaves the recommendations
            st, hist = _call(port, "GET", "/v1/users/u3/history")
            want = after[0]
            page.fill("#search", page.inner_text(f'#recs li[data-item-id="{want}"] .title')[:12])
            page.click("#search-form button")
            page.wait_for_selector(f'#search-results li[data-item-id="{want}"]')
            page.click(f'#search-results li[data-item-id="{want}"] button.add')
            page.wait_for_function(f"!Array.from(document.querySelectorAll('#recs li')).some("
                                   f"e => e.dataset.itemId === {want!r})")
            st, hist2 = _call(port, "GET", "/v1/users/u3/history")
            live = [(e["item_id"], e["kind"]) for e in hist2["events"] if e["source"] == "live"]
            assert live == [(first, "dismiss"), (want, "view")]
            page.wait_for_function("document.querySelector('#history li .kind')?.textContent === 'view'")
            # a new user starts from the most popular items
            page.click("#new-user")
            page.wait_for_function("document.getElementById('source').textContent.includes('popular')")
            page.screenshot(path=str(shots / "page-new-user.png"), full_page=True)
            # an item added through the API: search finds it, tagged new; viewed, it is in the history by
            # its title and the model reads it (the new user's recommendations now come from one event)
            fields = {"title": "A Film Nobody Has Rated", "genre": ["genre2"], "release_year": 1990}
            for item_id in ("page-new-1", "page-new-2"):
                assert _call(port, "POST", "/v1/items", {"item_id": item_id, "fields": fields})[0] == 201
            page.fill("#search", "nobody has rated")
            page.click("#search-form button")
            page.wait_for_selector('#search-results li[data-item-id="page-new-2"] .badge')
            assert page.inner_text('#search-results li[data-item-id="page-new-1"] .badge') == "new"
            page.click('#search-results li[data-item-id="page-new-1"] button.add')
            page.wait_for_function("document.getElementById('source').textContent.includes('from 1 events')")
            page.wait_for_function("document.querySelector('#history li .title')?.textContent === "
                                   "'A Film Nobody Has Rated'")
            user = page.input_value("#user")
            st, api = _call(port, "POST", "/v1/recommend", {"user_id": user, "k": 10})
            assert _rec_ids(page) == [x["item_id"] for x in api["items"]] and "page-new-1" not in _rec_ids(page)
            tagged = page.eval_on_selector_all("#recs li", "els => els.filter(e => e.querySelector('.badge'))"
                                                           ".map(e => e.dataset.itemId)")
            assert tagged == [x["item_id"] for x in api["items"] if x.get("added")]
            page.screenshot(path=str(shots / "page-added-item.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()

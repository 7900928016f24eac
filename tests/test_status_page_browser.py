"""The status page in a real browser: Debian's chromium, headless, driven by Playwright.

The server runs as a subprocess with real ``tcp`` checks against a listener the test
opens and closes. No browser is downloaded: Playwright drives /usr/bin/chromium with a
fresh profile and every background service of the browser off, so the only requests
are the page's own.

Set PETSAGE_STATUS_PAGE_SCREENSHOT=docs/status-page.png to write the screenshot of the
page with a failing check that the documentation shows.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest
from conftest import ServerProcess
from tcp_listener import free_port
from test_http import FAST, TOKEN, Listener, check_table, wait_for_status

CHROMIUM: Final = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.fail(f"{CHROMIUM} is missing: scripts/test installs Debian's chromium")

from playwright.sync_api import (  # noqa: E402 - after the clear message above
    BrowserContext,
    ConsoleMessage,
    Page,
    Playwright,
    Request,
    expect,
    sync_playwright,
)

pytestmark = pytest.mark.slow

CHROMIUM_ARGS: Final = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS: Final = 20_000
"""Deadline for what the page must show (generous: other tests share the machine)."""
BAD_COLOR: Final = re.compile(r"^rgb\((198, 40, 40|239, 83, 80)\)$")
"""The --bad colour of a failing check's card, in the light or the dark theme."""
SpawnServer = Callable[..., ServerProcess]


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as running:
        yield running


@pytest.fixture
def browser(playwright: Playwright, tmp_path: Path) -> Iterator[BrowserContext]:
    """Chromium with a fresh profile, the size of a phone's screen."""
    context = playwright.chromium.launch_persistent_context(
        tmp_path / "chromium-profile",
        executable_path=CHROMIUM,
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 390, "height": 844},
    )
    yield context
    context.close()


@dataclass
class OpenPage:
    page: Page
    origin: str
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def check_card(self, name: str, state: str) -> str:
        return f'article.check[data-check="{name}"][data-state="{state}"]'


@dataclass
class PageServer:
    server: ServerProcess
    http_port: int
    listener: Listener


@pytest.fixture
def page_server(tmp_path: Path, spawn_server: SpawnServer) -> Iterator[PageServer]:
    """A server with a critical check "db" on a listener and a non-critical "cache" on it too."""
    with Listener() as listener:
        config = check_table("db", listener.address, **FAST) + check_table(
            "cache", listener.address, critical=False, **FAST
        )
        path = tmp_path / "petsage.toml"
        path.write_text(config, encoding="utf-8")
        http_port = free_port()
        server = spawn_server(
            "--http-port", str(http_port), "--config", str(path), "--drain-seconds", "0"
        )
        wait_for_status(http_port, "/readyz", 200)
        yield PageServer(server, http_port, listener)


@pytest.fixture
def open_page(browser: BrowserContext, page_server: PageServer) -> OpenPage:
    page = browser.new_page()
    opened = OpenPage(page, f"http://127.0.0.1:{page_server.http_port}")

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            opened.console_errors.append(message.text)

    def on_request(sent: Request) -> None:
        opened.requests.append(sent.url)

    page.on("console", on_console)
    page.on("pageerror", lambda error: opened.console_errors.append(str(error)))
    page.on("request", on_request)
    page.goto(opened.origin + "/")
    return opened


def test_page_loads_cleanly_and_shows_every_name(open_page: OpenPage) -> None:
    page = open_page.page
    expect(page.locator(open_page.check_card("db", "passing"))).to_be_visible(timeout=WAIT_MS)
    expect(page.locator(open_page.check_card("cache", "passing"))).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#names li")).to_have_count(7)
    names = page.locator("#names li").evaluate_all("items => items.map(i => i.dataset.name)")
    assert sorted(names) == [
        "",
        "check.cache",
        "check.db",
        "liveness",
        "petsage.v1.SmokeTestService",
        "readiness",
        "startup",
    ]
    expect(page.locator("#overall")).to_have_text("serving")
    expect(page.locator("body")).to_have_attribute("data-connection", "live")
    expect(page.locator("#gone")).to_be_hidden()
    # A few polls later: still no error, and nothing but this server was asked for anything.
    polls = open_page.origin + "/status.json"
    deadline = time.monotonic() + WAIT_MS / 1000
    while open_page.requests.count(polls) < 4 and time.monotonic() < deadline:
        page.wait_for_timeout(100)  # lets Playwright deliver the page's events
    assert open_page.requests.count(polls) >= 4
    assert open_page.console_errors == []
    assert open_page.requests
    outside = [url for url in open_page.requests if not url.startswith(open_page.origin + "/")]
    assert outside == []
    asked = {url.removeprefix(open_page.origin) for url in open_page.requests}
    assert asked == {"/", "/status-page.js", "/status-page.css", "/favicon.svg", "/status.json"}
    # Readable on a phone and in a terminal-sized window: nothing wider than the screen.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.set_viewport_size({"width": 640, "height": 384})
    assert page.evaluate("document.documentElement.scrollWidth") <= 640


def test_a_check_turns_red_when_its_dependency_stops_and_green_when_back(
    open_page: OpenPage, page_server: PageServer, tmp_path: Path
) -> None:
    page = open_page.page
    expect(page.locator(open_page.check_card("db", "passing"))).to_be_visible(timeout=WAIT_MS)
    stopped = time.monotonic()
    page_server.listener.close()
    expect(page.locator(open_page.check_card("db", "failing"))).to_be_visible(timeout=WAIT_MS)
    red_after = time.monotonic() - stopped
    expect(page.locator("#overall")).to_have_text("not serving")
    red = page.locator(open_page.check_card("db", "failing"))
    # Asserted with a retry: the page rebuilds its cards on every poll, so a style read once
    # can land on a card just replaced (detached, its computed style empty).
    expect(red).to_have_css("border-left-color", BAD_COLOR)  # --bad, light or dark
    expect(red.locator(".badge")).to_have_text("failing")
    screenshot = Path(os.environ.get("PETSAGE_STATUS_PAGE_SCREENSHOT", tmp_path / "page.png"))
    page.set_viewport_size({"width": 900, "height": 640})
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    page.set_viewport_size({"width": 390, "height": 844})
    restarted = time.monotonic()
    page_server.listener.open()
    expect(page.locator(open_page.check_card("db", "passing"))).to_be_visible(timeout=WAIT_MS)
    green_after = time.monotonic() - restarted
    expect(page.locator("#overall")).to_have_text("serving")
    # The target is a second (check interval 0.1 s + one poll of 0.5 s); on a loaded
    # machine the browser and server may be slower, so this reports rather than asserts it.
    print(f"page red {red_after:.2f}s after the dependency stopped, green {green_after:.2f}s")
    assert open_page.console_errors == []


def test_the_page_says_plainly_when_the_server_has_gone(
    open_page: OpenPage, page_server: PageServer
) -> None:
    page = open_page.page
    expect(page.locator(open_page.check_card("db", "passing"))).to_be_visible(timeout=WAIT_MS)
    page_server.server.signal(signal.SIGTERM)
    page_server.server.wait()
    expect(page.locator("#gone")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#gone")).to_contain_text("Server gone.")
    expect(page.locator("body")).to_have_attribute("data-connection", "gone")
    # What was last known stays on screen, marked as stale rather than wiped.
    expect(page.locator(open_page.check_card("db", "passing"))).to_be_visible()


def test_with_a_token_the_checks_show_only_once_it_is_entered(
    browser: BrowserContext, tmp_path: Path, spawn_server: SpawnServer
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN, encoding="utf-8")
    with Listener() as listener:
        config = tmp_path / "petsage.toml"
        config.write_text(check_table("db", listener.address, **FAST), encoding="utf-8")
        http_port = free_port()
        spawn_server(
            "--http-port",
            str(http_port),
            "--config",
            str(config),
            "--auth-token-file",
            str(token_file),
        )
        wait_for_status(http_port, "/readyz", 200)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{http_port}/")
        expect(page.locator("#token-form")).to_be_visible(timeout=WAIT_MS)
        expect(page.locator('#names li[data-name="readiness"]')).to_be_visible()
        assert page.locator("article.check").count() == 0
        assert page.locator('#names li[data-name="check.db"]').count() == 0
        page.fill("#token", TOKEN)
        page.click("#token-form button")
        expect(page.locator('article.check[data-check="db"]')).to_be_visible(timeout=WAIT_MS)
        expect(page.locator('#names li[data-name="check.db"]')).to_be_visible()
        expect(page.locator("#token-form")).to_be_hidden()
        assert TOKEN not in page.content()

"""The fleet page in a real browser: Debian's chromium, headless, driven by Playwright.

``petsage-grpc fleet`` follows replicas that dnsmasq names (as in ``test_fleet.py``); the
page must show a replica whose dependency fails, one draining and then unreachable, and
one added, without a reload. Set PETSAGE_FLEET_PAGE_SCREENSHOT=docs/fleet-page.png to
write the screenshot the documentation shows.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
from fleet_harness import ROOT
from playwright.sync_api import ConsoleMessage, Playwright, Request, expect, sync_playwright
from tcp_listener import free_port
from test_fleet import Fleet, dns, fleet  # noqa: F401 - fixtures
from test_status_page_browser import CHROMIUM, CHROMIUM_ARGS, WAIT_MS

pytestmark = pytest.mark.slow

_LISTENING: Final = re.compile(r"fleet page on (http://\S+)")


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as running:
        yield running


def start_page(*args: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "petsage_grpc", "fleet", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    assert process.stderr is not None
    for line in process.stderr:
        match = _LISTENING.search(line)
        if match:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, match.group(1)
    process.wait(10)
    pytest.fail("the fleet page did not start")


def card(address: str, state: str | None = None) -> str:
    selector = f'article.replica[data-replica="{address}"]'
    return selector + (f'[data-state="{state}"]' if state else "")


def test_the_page_follows_failures_drains_and_new_replicas(
    fleet: Fleet,  # noqa: F811 - the fixture
    playwright: Playwright,
    tmp_path: Path,
) -> None:
    fleet.start("127.0.0.2", "--drain-seconds", "3")
    fleet.start("127.0.0.3")
    fleet.dns.set_hosts(["127.0.0.2", "127.0.0.3"])
    two, three, four = (fleet.address(f"127.0.0.{n}") for n in (2, 3, 4))
    process, origin = start_page(
        "--discover", fleet.target, "--http-port", str(free_port()), "--resolve-every", "500ms"
    )
    context = playwright.chromium.launch_persistent_context(
        tmp_path / "chromium-profile",
        executable_path=CHROMIUM,
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1100, "height": 760},
    )
    try:
        with urllib.request.urlopen(origin, timeout=10) as answer:  # noqa: S310 - loopback
            policy = answer.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy
        assert "script-src 'self'" in policy

        page = context.new_page()
        errors: list[str] = []
        elsewhere: list[str] = []

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                errors.append(message.text)

        def on_request(sent: Request) -> None:
            if not sent.url.startswith(origin):
                elsewhere.append(sent.url)

        page.on("console", on_console)
        page.on("request", on_request)
        page.goto(origin)
        expect(page.locator(card(two, "serving"))).to_be_visible(timeout=WAIT_MS)
        expect(page.locator(card(three, "serving"))).to_be_visible(timeout=WAIT_MS)
        expect(page.locator("#summary")).to_have_text("2 replicas · 2 serving", timeout=WAIT_MS)

        # .3's dependency fails: its card, its names and its check turn red.
        fleet.listeners["127.0.0.3"].close()
        failing = page.locator(card(three, "not-serving"))
        expect(failing).to_be_visible(timeout=WAIT_MS)
        expect(failing.locator('li[data-name="readiness"]')).to_have_attribute(
            "data-status", "NOT_SERVING", timeout=WAIT_MS
        )
        expect(failing.locator('li[data-check="db"]')).to_have_attribute(
            "data-status", "NOT_SERVING", timeout=WAIT_MS
        )
        expect(failing.locator(".changes")).to_contain_text("readiness SERVING → NOT_SERVING")
        expect(page.locator(card(two, "serving"))).to_be_visible()

        # A replica is added to DNS: a new card, without a reload.
        fleet.start("127.0.0.4")
        fleet.dns.set_hosts(["127.0.0.2", "127.0.0.3", "127.0.0.4"])
        expect(page.locator(card(four, "serving"))).to_be_visible(timeout=WAIT_MS)
        if shot := os.environ.get("PETSAGE_FLEET_PAGE_SCREENSHOT"):
            fleet.replicas["127.0.0.2"].stop()
            expect(page.locator(card(two, "draining"))).to_be_visible(timeout=WAIT_MS)
            page.screenshot(path=str(ROOT / shot), full_page=True)
        else:
            # .2 stops: draining first, then unreachable.
            fleet.replicas["127.0.0.2"].stop()
            expect(page.locator(card(two, "draining"))).to_be_visible(timeout=WAIT_MS)
        expect(page.locator(card(two, "unreachable"))).to_be_visible(timeout=WAIT_MS)
        expect(page.locator('#events li[data-event="lost"]')).to_contain_text(two)
        fleet.dns.set_hosts(["127.0.0.3", "127.0.0.4"])
        expect(page.locator(card(two))).to_have_count(0, timeout=WAIT_MS)

        # The follower goes away: the page says so and keeps the last state.
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        expect(page.locator("#gone")).to_be_visible(timeout=WAIT_MS)
        expect(page.locator(card(three, "not-serving"))).to_be_visible()
        assert not elsewhere, elsewhere
        assert all("fleet.json" in e or "Failed to load" in e for e in errors), errors
    finally:
        context.close()
        if process.poll() is None:
            process.kill()
            process.wait(10)

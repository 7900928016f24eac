"""The status page (``/``) and its JSON twin (``/status.json``) of ``serve --http-port``.

A real server runs as a subprocess with real ``tcp`` checks against listeners the test
owns; every request is a real HTTP request. What a browser makes of the page is in
test_status_page_browser.py.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from conftest import ServerProcess
from tcp_listener import free_port
from test_http import (
    FAST,
    TOKEN,
    VERSION_MARKERS,
    Listener,
    check_table,
    request,
    wait_for_status,
)

SpawnServer = Callable[..., ServerProcess]
Start = Callable[..., tuple[ServerProcess, int]]
WAIT: Final = 20.0
STANDARD_NAMES: Final = ["", "liveness", "petsage.v1.SmokeTestService", "readiness", "startup"]
ASSETS: Final = {
    "/": "text/html",
    "/status-page.js": "text/javascript",
    "/status-page.css": "text/css",
    "/favicon.svg": "image/svg+xml",
}
CHECK_FIELDS: Final = {
    "name",
    "kind",
    "critical",
    "state",
    "status",
    "last_duration_seconds",
    "timeout_seconds",
    "interval_seconds",
    "last_success_at",
    "consecutive_failures",
    "status_changes",
    "transitions",
}


@pytest.fixture
def listener() -> Iterator[Listener]:
    with Listener() as running:
        yield running


def status(port: int, **headers: str) -> dict[str, Any]:
    reply = request(port, "/status.json", headers=headers)
    assert reply.status == 200
    assert reply.headers.get_content_type() == "application/json"
    document: dict[str, Any] = json.loads(reply.body)
    return document


def status_until(
    port: int, predicate: Callable[[dict[str, Any]], bool], what: str, **headers: str
) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        document = status(port, **headers)
        if predicate(document):
            return document
        if time.monotonic() > deadline:
            pytest.fail(f"status.json did not show {what} within {WAIT:g}s: {document}")
        time.sleep(0.05)


def strings(value: object) -> Iterator[str]:
    """Every string in a JSON document, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def check(document: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in document["checks"] if c["name"] == name]
    assert len(found) == 1, document
    return found[0]


def test_page_and_assets_are_served_with_a_strict_policy(
    start_http: Start, listener: Listener
) -> None:
    _, port = start_http(check_table("db", listener.address, **FAST))
    page = request(port, "/")
    assert page.status == 200
    # Everything the page refers to is served here, and nothing else is referred to.
    references = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(references) == [
        "favicon.svg",
        "status-page.css",
        "status-page.js",
        "status.json",
    ]
    assert "<script>" not in page.text
    assert " style=" not in page.text
    for path, content_type in ASSETS.items():
        reply = request(port, path)
        assert reply.status == 200, path
        assert reply.headers.get_content_type() == content_type, path
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        policy = reply.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy
        assert "script-src 'self';" in policy
        assert "unsafe-inline" not in policy
        assert "unsafe-eval" not in policy
        assert reply.headers["Server"] == "PetSage"
        for marker in VERSION_MARKERS:
            assert marker not in reply.text, (path, marker)
        head = request(port, path, method="HEAD")
        assert (head.status, head.body) == (200, b"")
    script = request(port, "/status-page.js").text
    # No other origin: every fetch is relative to the page.
    assert "http:" not in script
    assert "https:" not in script
    assert request(port, "/", method="POST").status == 405


def test_status_json_lists_names_and_checks_without_targets_or_errors(
    start_http: Start, listener: Listener
) -> None:
    dead = free_port()
    config = check_table("db", f"127.0.0.1:{dead}", **FAST) + check_table(
        "cache", listener.address, critical=False, **FAST
    )
    server, port = start_http(config)
    document = status_until(
        port,
        lambda d: {c["state"] for c in d["checks"]} == {"failing", "passing"},
        "one check failing and one passing",
    )
    assert document["status"] == "NOT_SERVING"
    assert document["draining"] is False
    assert document["checks_hidden"] is None
    # --http-port runs the loop heartbeat, so the page shows the loop's lag.
    assert isinstance(document["loop_lag_seconds"], float)
    assert document["loop_lag_seconds"] >= 0
    statuses = {n["name"]: n["status"] for n in document["names"]}
    assert statuses == {
        "": "NOT_SERVING",
        "liveness": "SERVING",
        "readiness": "NOT_SERVING",
        "startup": "SERVING",
        "petsage.v1.SmokeTestService": "NOT_SERVING",
        "check.cache": "SERVING",
        "check.db": "NOT_SERVING",
    }
    db, cache = check(document, "db"), check(document, "cache")
    assert [c["name"] for c in document["checks"]] == ["db", "cache"]  # configuration order
    for each in (db, cache):
        assert set(each) == CHECK_FIELDS
        assert each["kind"] == "tcp"
        assert each["timeout_seconds"] == 0.5
        assert each["interval_seconds"] == 0.1
        assert 0 <= each["last_duration_seconds"] < 0.5 + 0.5
    assert (db["critical"], db["status"], db["last_success_at"]) == (True, "NOT_SERVING", None)
    assert db["consecutive_failures"] >= 1
    assert [t["status"] for t in db["transitions"]] == ["NOT_SERVING"]
    assert (cache["critical"], cache["status"], cache["consecutive_failures"]) == (
        False,
        "SERVING",
        0,
    )
    assert cache["last_success_at"] <= document["generated_at"]
    assert [t["status"] for t in cache["transitions"]] == ["NOT_SERVING", "SERVING"]
    assert cache["status_changes"] == 1
    # Nothing public names a host, port, error or version.
    text = " ".join(strings(document))
    for marker in ("127.0.0.1", str(dead), str(listener.port), str(server.port), *VERSION_MARKERS):
        assert marker not in text, marker
    for word in ("Error", "Refused", "refused", "Traceback", "errno"):
        assert word not in text


def test_transitions_follow_the_dependency(start_http: Start, listener: Listener) -> None:
    _, port = start_http(check_table("db", listener.address, **FAST))
    status_until(port, lambda d: check(d, "db")["state"] == "passing", "db passing")
    listener.close()
    down = status_until(port, lambda d: check(d, "db")["state"] == "failing", "db failing")
    assert down["status"] == "NOT_SERVING"
    listener.open()
    back = status_until(port, lambda d: check(d, "db")["state"] == "passing", "db passing again")
    db = check(back, "db")
    assert [t["status"] for t in db["transitions"]] == [
        "NOT_SERVING",
        "SERVING",
        "NOT_SERVING",
        "SERVING",
    ]
    times = [t["at"] for t in db["transitions"]]
    assert times == sorted(times)
    assert db["status_changes"] == 3
    readiness = next(n for n in back["names"] if n["name"] == "readiness")
    assert [t["status"] for t in readiness["transitions"]][-2:] == ["NOT_SERVING", "SERVING"]


def test_checks_and_other_names_need_the_token_when_one_is_set(
    tmp_path: Path, start_http: Start, listener: Listener
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    _, port = start_http(
        check_table("db", listener.address, **FAST), "--auth-token-file", str(token_file)
    )
    wait_for_status(port, "/readyz", 200)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        anonymous = status(port, **headers)
        assert anonymous["checks_hidden"] == "token"
        assert anonymous["checks"] == []
        assert sorted(n["name"] for n in anonymous["names"]) == STANDARD_NAMES
        assert "db" not in " ".join(strings(anonymous))
    allowed = status(port, Authorization=f"Bearer {TOKEN}")
    assert allowed["checks_hidden"] is None
    assert [c["name"] for c in allowed["checks"]] == ["db"]
    assert "check.db" in {n["name"] for n in allowed["names"]}
    assert TOKEN not in json.dumps(allowed)


def test_report_checks_false_hides_the_checks(
    tmp_path: Path, start_http: Start, listener: Listener
) -> None:
    config = "[smoke_test]\nreport_checks = false\n" + check_table("db", listener.address, **FAST)
    _, port = start_http(config)
    wait_for_status(port, "/readyz", 200)
    document = status(port)
    assert document["checks_hidden"] == "config"
    assert document["checks"] == []
    assert sorted(n["name"] for n in document["names"]) == STANDARD_NAMES
    assert "db" not in " ".join(strings(document))


def test_draining_shows_while_the_server_stops(start_http: Start, listener: Listener) -> None:
    server, port = start_http(check_table("db", listener.address, **FAST), "--drain-seconds", "30")
    status_until(port, lambda d: d["status"] == "SERVING", "the server serving")
    server.signal(signal.SIGTERM)
    draining = status_until(port, lambda d: d["draining"], "the drain")
    statuses = {n["name"]: n["status"] for n in draining["names"]}
    assert statuses["readiness"] == "NOT_SERVING"
    assert statuses["liveness"] == "SERVING"
    # The check itself still passes: the page tells a drain from an outage.
    assert check(draining, "db")["state"] == "passing"
    readiness = next(n for n in draining["names"] if n["name"] == "readiness")
    assert readiness["transitions"][-1]["status"] == "NOT_SERVING"
    assert request(port, "/status.json", method="HEAD").body == b""

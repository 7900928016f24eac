"""The status page for people (``/``) and its JSON twin for scripts (``/status.json``).

The page is three static files shipped with the package; its script polls
``status.json`` twice a second while the page is visible. Polling rather than
server-sent events: a poll is a short request, so the page holds nothing on the server
between polls (no stream to cap, time out, keep alive through proxies or end on a
graceful stop), a server that has gone away shows as a failed request within one poll,
and a hidden tab stops asking. Open pages share one rendering until the board or a
check's result changes (at most every :data:`_MIN_RENDER_SECONDS`, at least every
:data:`_MAX_RENDER_AGE`), so each poll costs the server little more than an HTTP exchange.

What it shows follows the rules of everything public: check names, kinds, states and
timings only (never a target, host, error text or version); the checks and the names
other than the standard five only to callers with the bearer token when one is set;
no checks at all with ``[smoke_test] report_checks = false``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable
from importlib import resources
from typing import Any, Final

from aiohttp import web

from petsage_grpc.board._check import CHECK_PREFIX
from petsage_grpc.board._monitor import CheckState, HealthMonitor
from petsage_grpc.board._status import (
    LIVENESS,
    OVERALL,
    READINESS,
    SMOKE_TEST_SERVICE,
    STARTUP,
    ServingStatus,
    StatusBoard,
    Transition,
)

__all__ = ["STATUS_JSON_PATH", "StatusPage", "status_document"]

STATUS_JSON_PATH: Final = "/status.json"
_STANDARD_NAMES: Final = (OVERALL, LIVENESS, READINESS, STARTUP, SMOKE_TEST_SERVICE)
_MIN_RENDER_SECONDS: Final = 0.1
"""A rendering is served this long at least, however fast checks change (well under a poll)."""
_MAX_RENDER_AGE: Final = 1.0
"""A rendering is served this long at most, even if nothing changed (its times move on)."""
_ASSETS: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/status-page.js": ("status-page.js", "text/javascript; charset=utf-8"),
    "/status-page.css": ("status-page.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
# Only this server's own files and status.json: no inline script or style, no other origin.
_CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS: Final = {
    "Content-Security-Policy": _CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}

Handler = Callable[[web.BaseRequest], Awaitable[web.Response]]


def _transitions(history: Iterable[Transition]) -> list[dict[str, Any]]:
    return [{"at": round(t.at, 3), "status": t.status.name} for t in history]


def _state(state: CheckState) -> str:
    if not state.completed_first_attempt:
        return "pending"
    if not state.serving:
        return "failing"
    return "degraded" if state.consecutive_failures else "passing"


def _check(state: CheckState, board: StatusBoard) -> dict[str, Any]:
    check = state.check
    duration = state.last_duration
    success = state.last_success_time
    return {
        "name": check.name,
        "kind": check.kind,
        "critical": check.critical,
        "state": _state(state),
        "status": (ServingStatus.SERVING if state.serving else ServingStatus.NOT_SERVING).name,
        "last_duration_seconds": None if duration is None else round(duration, 6),
        "timeout_seconds": check.timeout,
        "interval_seconds": check.interval,
        "last_success_at": None if success is None else round(success, 3),
        "consecutive_failures": state.consecutive_failures,
        "status_changes": state.flips,
        "transitions": _transitions(board.history(check.service_name)),
    }


def status_document(
    board: StatusBoard,
    monitor: HealthMonitor | None,
    *,
    checks_hidden: str | None,
) -> dict[str, Any]:
    """Everything the status page shows, as ``/status.json`` serves it.

    *checks_hidden* is None to show every name and check, else why they are hidden
    (``"token"`` or ``"config"``): then only the five standard names are listed and no
    check. Times are seconds since the epoch.
    """
    snapshot = board.snapshot()
    if checks_hidden is None:
        shown = sorted(snapshot, key=lambda name: (name.startswith(CHECK_PREFIX), name))
    else:
        shown = [name for name in _STANDARD_NAMES if name in snapshot]
    names = []
    for name in shown:
        history = board.history(name)
        names.append(
            {
                "name": name,
                "status": snapshot[name].name,
                "since": round(history[-1].at, 3) if history else None,
                "transitions": _transitions(history),
            }
        )
    overall = snapshot.get(OVERALL, ServingStatus.NOT_SERVING)
    states = monitor.states if monitor is not None and checks_hidden is None else ()
    return {
        "status": overall.name,
        "draining": board.draining,
        "generated_at": round(time.time(), 3),
        "loop_lag_seconds": board.loop_lag_seconds,
        "checks_hidden": checks_hidden,
        "names": names,
        "checks": [_check(state, board) for state in states],
    }


class StatusPage:
    """The page's routes for :class:`~petsage_grpc.server._http.HttpFace`.

    *may_see_checks* says whether a request carries the bearer token (always true
    without one). The event loop's lag is the board's (None while no heartbeat runs).
    """

    def __init__(
        self,
        board: StatusBoard,
        *,
        monitor: HealthMonitor | None,
        report_checks: bool,
        may_see_checks: Callable[[web.BaseRequest], bool],
        headers: dict[str, str],
    ) -> None:
        self._board = board
        self._monitor = monitor
        self._report_checks = report_checks
        self._may_see_checks = may_see_checks
        self._headers = headers
        self._assets: dict[str, bytes] = {}  # read on first request: idle servers hold none
        self._rendered: dict[str | None, tuple[float, object, bytes]] = {}

    def routes(self) -> dict[str, Handler]:
        """The page's paths and their handlers (GET and HEAD only, as every route)."""
        routes: dict[str, Handler] = {STATUS_JSON_PATH: self._status_json}
        for path in _ASSETS:
            routes[path] = self._asset
        return routes

    def _hidden_because(self, request: web.BaseRequest) -> str | None:
        if not self._report_checks:
            return "config"
        return None if self._may_see_checks(request) else "token"

    def _version(self) -> object:
        """What status.json shows changes only when this does (the clock aside)."""
        results = (
            ()
            if self._monitor is None
            else tuple(
                (s.consecutive_successes, s.consecutive_failures, s.last_duration)
                for s in self._monitor.states
            )
        )
        return self._board.revision, results, self._board.loop_lag_seconds

    async def _status_json(self, request: web.BaseRequest) -> web.Response:
        hidden = self._hidden_because(request)
        now = time.monotonic()
        version = self._version()
        cached = self._rendered.get(hidden)
        if cached is None or not (
            now - cached[0] < _MIN_RENDER_SECONDS
            or (now - cached[0] < _MAX_RENDER_AGE and cached[1] == version)
        ):
            document = status_document(self._board, self._monitor, checks_hidden=hidden)
            cached = self._rendered[hidden] = (now, version, json.dumps(document).encode())
        return web.Response(
            body=cached[2],
            headers={
                **self._headers,
                "Content-Type": "application/json",
                "X-Content-Type-Options": "nosniff",
            },
        )

    async def _asset(self, request: web.BaseRequest) -> web.Response:
        file_name, content_type = _ASSETS[request.path]
        body = self._assets.get(file_name)
        if body is None:
            body = self._assets[file_name] = (
                resources.files(__package__).joinpath("status_page", file_name).read_bytes()
            )
        return web.Response(
            body=body,
            headers={**self._headers, **_PAGE_HEADERS, "Content-Type": content_type},
        )

"""The HTTP face: the seed's smoke test, probe endpoints and metrics, on one aiohttp listener.

For load balancers and uptime monitors that only speak HTTP. Every answer is read from
the same status board as the gRPC services, so HTTP and gRPC never disagree.

- ``GET /api/v1/health/smoke-test``: 200 ``{"status": "ok", "message": ...}`` while the
  smoke test's entry is SERVING, else 503 ``{"status": "unavailable", "message": ...}``.
- ``GET|HEAD /livez``, ``/readyz``, ``/startupz``: 200 or 503 following ``liveness``,
  ``readiness``, ``startup``; ``?verbose`` adds one line per dependency check (names
  only, and only for callers with the bearer token when one is configured), and on
  ``/livez`` one for the event loop (its lag and stalls).
- ``GET /metrics``: Prometheus text, when metrics are on.
- ``GET /``: the status page for people, and ``GET /status.json``, the same for scripts
  (see :mod:`petsage_grpc.server._status_page`).

Built on aiohttp's low-level server so that even its answers to malformed requests
carry no version and echo nothing back, and log no traceback (one warning a minute per
kind, with a count). Connections are capped in all and per peer address (beyond, a new
one is closed as soon as it is accepted) and closed after :attr:`HttpLimits.idle_seconds`
without a whole request, so they cannot be held for free. No access log unless asked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web

from petsage_grpc.board._heartbeat import LoopHeartbeat
from petsage_grpc.board._monitor import HealthMonitor
from petsage_grpc.board._status import (
    LIVENESS,
    READINESS,
    SMOKE_TEST_SERVICE,
    STARTUP,
    ServingStatus,
    StatusBoard,
)
from petsage_grpc.server._logging import WarningTally, component_states
from petsage_grpc.server._metrics import Metrics
from petsage_grpc.server._status_page import StatusPage
from petsage_grpc.services._auth import BearerToken
from petsage_grpc.services._smoke_test import NOT_SERVING_DETAILS, SMOKE_TEST_MESSAGE, check_states

__all__ = ["HttpFace", "HttpLimits"]

_log = logging.getLogger("petsage_grpc.http")

SMOKE_TEST_PATH: Final = "/api/v1/health/smoke-test"
_PROBES: Final = {"/livez": LIVENESS, "/readyz": READINESS, "/startupz": STARTUP}
# Probe and smoke test requests carry no body and short headers; refuse anything else.
_MAX_BODY_BYTES: Final = 1024
_MAX_HEADER_BYTES: Final = 1024
_RECEIVE_BUFFER: Final = 16 * 1024
"""The kernel's receive buffer per HTTP connection (it doubles it; Linux's default grows to
6 MiB): with 400 connections pushing 126 KB of headers each, the kernel's buffers and
aiohttp's reads took the server past its 128 MiB limit (docs/reliability.md)."""
_MAX_HEADERS: Final = 32
"""Header fields per request (aiohttp's default: 128). A browser sends about 15, a probe
3; 400 connections holding 126 headers of 1 KiB each took the server past 128 MiB (OOM
kill), with 32 each holds at most ~33 KiB (docs/reliability.md)."""
_JSON: Final = "application/json"
_SMOKE_OK: Final = json.dumps({"status": "ok", "message": SMOKE_TEST_MESSAGE}).encode()
_SMOKE_UNAVAILABLE: Final = json.dumps(
    {"status": "unavailable", "message": NOT_SERVING_DETAILS}
).encode()
# aiohttp's default Server header names Python's and aiohttp's versions.
_HEADERS: Final = {"Server": "PetSage", "Cache-Control": "no-store"}
_Handler = Callable[[web.BaseRequest], Awaitable[web.Response]]


def _plain(status: int, text: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=text, headers={**_HEADERS, **headers})


@dataclass(frozen=True, kw_only=True)
class HttpLimits:
    """What one HTTP client can hold: connections, and how long an idle one stays."""

    max_connections: int = 512
    """Open connections in all; beyond, a new one is closed as soon as it is accepted
    (aiohttp holds about 9 KiB per keep-alive connection)."""
    max_connections_per_peer: int = 128
    """Open connections from one IP address (a probe comes from another address); room
    for a hundred status pages open behind one NAT address."""
    idle_seconds: float = 10.0
    """A connection without a whole request this long after it opened, or after its last
    answer, is closed: the header-read and the keep-alive timeout at once."""
    access_log: bool = False
    """Log one INFO line per request (aiohttp's access log)."""

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_connections_per_peer < 1:
            raise ValueError("HTTP connection caps must be at least 1")
        if not self.idle_seconds > 0:
            raise ValueError(f"idle_seconds must be above 0, not {self.idle_seconds}")


def _error_kind(status: int, exc: BaseException | None) -> str:
    """A fixed label for a malformed request (never its content)."""
    name = type(exc).__name__ if exc is not None else "error"
    return f"{status} {name}"


class _QuietRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, capped.

    Its error answers name no version, echo nothing and log no traceback.
    """

    def __init__(self, manager: _QuietServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._quiet = manager
        self._peer: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self._quiet.admit(address):
            # Refused cheaply: no task, no parser, no timer; the descriptor goes back now.
            if isinstance(transport, asyncio.Transport):
                transport.abort()
            else:
                transport.close()
            return
        self._peer = address
        if isinstance(getattr(transport, "max_size", None), int):
            # asyncio reads up to 256 KiB at a time into a fresh bytes object: 400
            # connections pushing headers took 480 KiB each. A request here is small.
            transport.max_size = _RECEIVE_BUFFER  # type: ignore[attr-defined]
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._peer is None:
            return  # refused in connection_made
        self._quiet.release(self._peer)
        self._peer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own handle_error logs a traceback per request: one counted line instead.
        self._quiet.malformed.add(_error_kind(status, exc))
        response = _plain(status, f"{status} {HTTPStatus(status).phrase}\n")
        response.force_close()
        return response


class _QuietServer(web.Server):
    def __init__(self, handler: Any, *, limits: HttpLimits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._limits = limits
        self._open = 0
        self._by_peer: Counter[str] = Counter()
        self.malformed = WarningTally(_log, "malformed HTTP requests")
        self._refused = WarningTally(_log, "HTTP connections refused")

    def __call__(self) -> web.RequestHandler:
        return _QuietRequestHandler(self, loop=self._loop, **self._kwargs)

    def admit(self, peer: str) -> bool:
        if self._open >= self._limits.max_connections:
            self._refused.add(f"at the cap of {self._limits.max_connections} in all")
            return False
        if self._by_peer[peer] >= self._limits.max_connections_per_peer:
            self._refused.add(f"at the cap of {self._limits.max_connections_per_peer} per peer")
            return False
        self._open += 1
        self._by_peer[peer] += 1
        return True

    def release(self, peer: str) -> None:
        self._open -= 1
        self._by_peer[peer] -= 1
        if not self._by_peer[peer]:
            del self._by_peer[peer]


class HttpFace:
    """One aiohttp server for the HTTP endpoints, started and stopped with the gRPC server."""

    def __init__(
        self,
        board: StatusBoard,
        *,
        metrics: Metrics | None = None,
        auth: BearerToken | None = None,
        monitor: HealthMonitor | None = None,
        report_checks: bool = True,
        heartbeat: LoopHeartbeat | None = None,
        limits: HttpLimits | None = None,
    ) -> None:
        """Serve *board*; *monitor*'s checks on the status page unless not *report_checks*.

        *heartbeat*, when the server runs one, adds the event loop's lag and stalls to
        ``/livez?verbose`` and the status page. *limits* caps connections (HttpLimits
        defaults if None).
        """
        self._board = board
        self._metrics = metrics
        self._auth = auth
        self._report_checks = report_checks
        self._limits = limits or HttpLimits()
        self._heartbeat = heartbeat
        self._routes: dict[str, _Handler] = {SMOKE_TEST_PATH: self._smoke_test}
        for path, service in _PROBES.items():
            self._routes[path] = self._probe(service)
        if metrics is not None:
            self._routes["/metrics"] = self._render_metrics
        page = StatusPage(
            board,
            monitor=monitor,
            report_checks=report_checks,
            may_see_checks=self._may_see_checks,
            headers=_HEADERS,
        )
        self._routes.update(page.routes())
        self._runner: web.ServerRunner | None = None

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        route = self._routes.get(request.path)
        if route is None:
            return _plain(404, "404 Not Found\n")
        if request.method not in {"GET", "HEAD"}:
            return _plain(405, "405 Method Not Allowed\n", Allow="GET, HEAD")
        length = request.content_length
        if (length is not None and length > _MAX_BODY_BYTES) or (
            length is None and "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        ):
            response = _plain(413, "413 Request Entity Too Large\n")
            response.force_close()
            return response
        return await route(request)

    async def _smoke_test(self, request: web.BaseRequest) -> web.Response:
        serving = self._board.get(SMOKE_TEST_SERVICE) is ServingStatus.SERVING
        return web.Response(
            status=200 if serving else 503,
            body=_SMOKE_OK if serving else _SMOKE_UNAVAILABLE,
            content_type=_JSON,
            headers=_HEADERS,
        )

    def _probe(self, service: str) -> _Handler:
        async def probe(request: web.BaseRequest) -> web.Response:
            serving = self._board.get(service) is ServingStatus.SERVING
            lines = []
            if "verbose" in request.query and self._may_see_checks(request):
                for name, ok in sorted(check_states(self._board).items()):
                    lines.append(f"[+]{name} ok" if ok else f"[-]{name} failed")
                if service == LIVENESS and self._heartbeat is not None:
                    lines.append(self._loop_line(self._heartbeat))
                if service == LIVENESS:
                    # Background parts (the connection shedder): never silent when they fail.
                    for part, problem in sorted(component_states().items()):
                        lines.append(
                            f"[-]{part} failing: {problem}" if problem else f"[+]{part} ok"
                        )
            lines.append(f"{request.path.strip('/')} {'ok' if serving else 'failed'}")
            return _plain(200 if serving else 503, "\n".join(lines) + "\n")

        return probe

    @staticmethod
    def _loop_line(heartbeat: LoopHeartbeat) -> str:
        lag = f"lag {heartbeat.lag_seconds * 1000:.0f}ms, {heartbeat.stalls} stall(s)"
        return f"[-]event-loop stalled: {lag}" if heartbeat.stalled else f"[+]event-loop ok: {lag}"

    def _may_see_checks(self, request: web.BaseRequest) -> bool:
        """SmokeTest's rule: check names only with report_checks, and with the token if any."""
        if not self._report_checks:
            return False
        if self._auth is None:
            return True
        return self._auth.allows((key.lower(), value) for key, value in request.headers.items())

    async def _render_metrics(self, request: web.BaseRequest) -> web.Response:
        assert self._metrics is not None  # noqa: S101 - the route exists only with metrics
        body, content_type = self._metrics.render(with_checks=self._may_see_checks(request))
        return web.Response(body=body, headers={**_HEADERS, "Content-Type": content_type})

    async def start(self, host: str, port: int) -> int:
        """Listen on *host*:*port* ("" for every interface); return the bound port.

        Raises:
            OSError: the address cannot be listened on.
        """
        server = _QuietServer(
            self._handle,
            limits=self._limits,
            max_line_size=_MAX_HEADER_BYTES,
            max_field_size=_MAX_HEADER_BYTES,
            max_headers=_MAX_HEADERS,
            # aiohttp 3.10+ arms this timer when a connection opens and closes the
            # connection when it fires without a whole request: the header-read timeout.
            keepalive_timeout=self._limits.idle_seconds,
            **({} if self._limits.access_log else {"access_log": None}),
        )
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host or None, port, reuse_port=False)
        try:
            await site.start()
        except OSError:
            await self.stop()
            raise
        # Accepted connections inherit the listener's receive buffer: what a client can
        # push at the server before aiohttp has read (and refused) its headers.
        listening = getattr(getattr(site, "_server", None), "sockets", ())
        for sock in listening:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
        bound = port
        for address in self._runner.addresses:
            bound = int(address[1])
            break
        _log.info("HTTP on port %d", bound, extra={"event": "http", "port": bound})
        return bound

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

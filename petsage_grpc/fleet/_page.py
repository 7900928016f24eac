"""The fleet page (``/``) and its JSON twin (``/fleet.json``), served by ``petsage-grpc fleet``.

Built as the status page is: static files shipped with the package (no other origin, a
strict Content-Security-Policy, no inline script or style), and a script that polls
``fleet.json`` twice a second while the page is visible. Polling holds nothing on the
follower between polls, so a hundred open pages cost a hundred short requests a second
and no streams; renderings are shared for :data:`_MIN_RENDER_SECONDS`.

Its HTTP server is capped and quiet as the server's HTTP face is (kept apart: the fleet
view imports nothing of the server): 1 KiB request lines and headers, 10 s to send a
request, :data:`_MAX_CONNECTIONS` connections, fixed text for malformed requests.

The page shows what the follower knows: replica addresses, their states, names, checks
(where the token let List or SmokeTest name them) and transitions. It listens on
127.0.0.1 unless told otherwise: whoever reaches it sees what the token unlocked.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

if TYPE_CHECKING:
    from petsage_grpc.fleet._follower import Fleet, FleetEvent

__all__ = ["FLEET_JSON_PATH", "FleetPage"]

FLEET_JSON_PATH: Final = "/fleet.json"
_EVENTS_KEPT: Final = 100
_MIN_RENDER_SECONDS: Final = 0.1
_ASSETS: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/fleet-page.js": ("fleet-page.js", "text/javascript; charset=utf-8"),
    "/fleet-page.css": ("fleet-page.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
_MAX_HEADER_BYTES: Final = 1024
_IDLE_SECONDS: Final = 10.0
_MAX_CONNECTIONS: Final = 256
# aiohttp's default Server header names Python's and aiohttp's versions.
_PLAIN_HEADERS: Final = {"Server": "PetSage", "Cache-Control": "no-store"}
_HEADERS: Final = {
    **_PLAIN_HEADERS,
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def _plain(status: int, text: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=text, headers={**_PLAIN_HEADERS, **headers})


class _QuietRequestHandler(web.RequestHandler):
    """aiohttp's connection handler; a malformed request gets fixed text, no traceback."""

    def __init__(self, manager: _QuietServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._quiet = manager
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._quiet.open >= _MAX_CONNECTIONS:
            transport.close()  # over the cap: closed at once, nothing allocated
            return
        self._quiet.open += 1
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._counted:
            return
        self._quiet.open -= 1
        self._counted = False
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        response = _plain(status, f"{status} {HTTPStatus(status).phrase}\n")
        response.force_close()
        return response


class _QuietServer(web.Server):
    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.open = 0

    def __call__(self) -> web.RequestHandler:
        return _QuietRequestHandler(self, loop=self._loop, **self._kwargs)


class FleetPage:
    """The page over *fleet*; :meth:`record` each event so the page lists the latest."""

    def __init__(self, fleet: Fleet, *, targets: list[str]) -> None:
        self._fleet = fleet
        self._targets = targets
        self._events: deque[dict[str, Any]] = deque(maxlen=_EVENTS_KEPT)
        self._assets: dict[str, bytes] = {}
        self._rendered: tuple[float, bytes] | None = None
        self._runner: web.ServerRunner | None = None

    def record(self, event: FleetEvent) -> None:
        """Keep *event* for the page's list of the latest events."""
        self._events.append(
            {
                "at": round(event.at, 3),
                "replica": event.replica,
                "event": event.kind,
                "text": event.text,
            }
        )
        self._rendered = None

    def document(self) -> dict[str, Any]:
        """What ``/fleet.json`` serves. Times are seconds since the epoch."""
        return {
            "generated_at": round(time.time(), 3),
            "targets": self._targets,
            "replicas": self._fleet.snapshot(),
            "not_followed": self._fleet.not_followed,
            "resolve_errors": self._fleet.resolve_errors,
            "events": list(reversed(self._events)),
        }

    async def start(self, host: str, port: int) -> int:
        """Listen on *host*:*port* (0: any free port); return the port.

        Raises:
            OSError: the address cannot be bound.
        """
        server = _QuietServer(
            self._handle,
            max_line_size=_MAX_HEADER_BYTES,
            max_field_size=_MAX_HEADER_BYTES,
            keepalive_timeout=_IDLE_SECONDS,  # also the time to send a whole request
            access_log=None,
        )
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError:
            await self.stop()
            raise
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        if request.path != FLEET_JSON_PATH and request.path not in _ASSETS:
            return _plain(404, "404 Not Found\n")
        if request.method not in {"GET", "HEAD"}:
            return _plain(405, "405 Method Not Allowed\n", Allow="GET, HEAD")
        if request.path == FLEET_JSON_PATH:
            return await self._fleet_json(request)
        return await self._asset(request)

    async def _fleet_json(self, request: web.BaseRequest) -> web.Response:
        now = time.monotonic()
        if self._rendered is None or now - self._rendered[0] >= _MIN_RENDER_SECONDS:
            self._rendered = (now, json.dumps(self.document()).encode())
        return web.Response(
            body=self._rendered[1],
            headers={**_HEADERS, "Content-Type": "application/json"},
        )

    async def _asset(self, request: web.BaseRequest) -> web.Response:
        file_name, content_type = _ASSETS[request.path]
        body = self._assets.get(file_name)
        if body is None:
            body = self._assets[file_name] = (
                resources.files(__package__).joinpath("page", file_name).read_bytes()
            )
        return web.Response(body=body, headers={**_HEADERS, "Content-Type": content_type})

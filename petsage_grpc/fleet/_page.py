"""The fleet page (``/``) and its JSON twin (``/fleet.json``), served by ``petsage-grpc fleet``.

Built as the status page is: static files shipped with the package (no other origin, a
strict Content-Security-Policy, no inline script or style), and a script that polls
``fleet.json`` twice a second while the page is visible. Polling holds nothing on the
follower between polls, so a hundred open pages cost a hundred short requests a second
and no streams; renderings are shared for :data:`_MIN_RENDER_SECONDS`.

The page shows what the follower knows: replica addresses, their states, names, checks
(where the token let List or SmokeTest name them) and transitions. It listens on
127.0.0.1 unless told otherwise: whoever reaches it sees what the token unlocked.
"""

from __future__ import annotations

import json
import time
from collections import deque
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
_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class FleetPage:
    """The page over *fleet*; :meth:`record` each event so the page lists the latest."""

    def __init__(self, fleet: Fleet, *, targets: list[str]) -> None:
        self._fleet = fleet
        self._targets = targets
        self._events: deque[dict[str, Any]] = deque(maxlen=_EVENTS_KEPT)
        self._assets: dict[str, bytes] = {}
        self._rendered: tuple[float, bytes] | None = None
        self._runner: web.AppRunner | None = None

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
        app = web.Application(handler_args={"max_field_size": 8190, "max_line_size": 8190})
        app.router.add_get(FLEET_JSON_PATH, self._fleet_json)
        for path in _ASSETS:
            app.router.add_get(path, self._asset)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _fleet_json(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        if self._rendered is None or now - self._rendered[0] >= _MIN_RENDER_SECONDS:
            self._rendered = (now, json.dumps(self.document()).encode())
        return web.Response(
            body=self._rendered[1],
            headers={**_HEADERS, "Content-Type": "application/json"},
        )

    async def _asset(self, request: web.Request) -> web.Response:
        file_name, content_type = _ASSETS[request.path]
        body = self._assets.get(file_name)
        if body is None:
            body = self._assets[file_name] = (
                resources.files(__package__).joinpath("page", file_name).read_bytes()
            )
        return web.Response(body=body, headers={**_HEADERS, "Content-Type": content_type})

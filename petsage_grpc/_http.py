"""The HTTP face: the seed's smoke test, probe endpoints and metrics, on one aiohttp listener.

For load balancers and uptime monitors that only speak HTTP. Every answer is read from
the same status board as the gRPC services, so HTTP and gRPC never disagree.

- ``GET /api/v1/health/smoke-test``: 200 ``{"status": "ok", "message": ...}`` while the
  smoke test's entry is SERVING, else 503 ``{"status": "unavailable", "message": ...}``.
- ``GET|HEAD /livez``, ``/readyz``, ``/startupz``: 200 or 503 following ``liveness``,
  ``readiness``, ``startup``; ``?verbose`` adds one line per dependency check (names
  only, and only for callers with the bearer token when one is configured).
- ``GET /metrics``: Prometheus text, when metrics are on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from petsage_grpc._auth import BearerToken
from petsage_grpc._check import CHECK_PREFIX
from petsage_grpc._metrics import Metrics
from petsage_grpc._smoke_test import NOT_SERVING_DETAILS, SMOKE_TEST_MESSAGE
from petsage_grpc._status import (
    LIVENESS,
    READINESS,
    SMOKE_TEST_SERVICE,
    STARTUP,
    ServingStatus,
    StatusBoard,
)

__all__ = ["HttpFace"]

_log = logging.getLogger("petsage_grpc.http")

SMOKE_TEST_PATH: Final = "/api/v1/health/smoke-test"
_PROBES: Final = {"/livez": LIVENESS, "/readyz": READINESS, "/startupz": STARTUP}
# Probe and smoke test requests carry no body; anything large is not one of them.
_MAX_REQUEST_BYTES: Final = 1024
_JSON: Final = "application/json"
_SMOKE_OK: Final = json.dumps({"status": "ok", "message": SMOKE_TEST_MESSAGE}).encode()
_SMOKE_UNAVAILABLE: Final = json.dumps(
    {"status": "unavailable", "message": NOT_SERVING_DETAILS}
).encode()
_NO_CACHE: Final = {"Cache-Control": "no-store"}


async def _hide_versions(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp's default Server header names Python's and aiohttp's versions.
    response.headers["Server"] = "PetSage"


class HttpFace:
    """One aiohttp server for the HTTP endpoints, started and stopped with the gRPC server."""

    def __init__(
        self,
        board: StatusBoard,
        *,
        metrics: Metrics | None = None,
        auth: BearerToken | None = None,
    ) -> None:
        self._board = board
        self._metrics = metrics
        self._auth = auth
        self._runner: web.AppRunner | None = None

    def _application(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_REQUEST_BYTES)
        app.on_response_prepare.append(_hide_versions)
        app.router.add_get(SMOKE_TEST_PATH, self._smoke_test)
        for path, service in _PROBES.items():
            app.router.add_get(path, self._probe(service))  # GET also answers HEAD
        if self._metrics is not None:
            app.router.add_get("/metrics", self._render_metrics)
        return app

    async def _smoke_test(self, request: web.Request) -> web.Response:
        serving = self._board.get(SMOKE_TEST_SERVICE) is ServingStatus.SERVING
        return web.Response(
            status=200 if serving else 503,
            body=_SMOKE_OK if serving else _SMOKE_UNAVAILABLE,
            content_type=_JSON,
            headers=_NO_CACHE,
        )

    def _probe(self, service: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def probe(request: web.Request) -> web.Response:
            serving = self._board.get(service) is ServingStatus.SERVING
            lines = []
            if "verbose" in request.query and self._may_see_checks(request):
                for name, status in sorted(self._board.snapshot().items()):
                    if name.startswith(CHECK_PREFIX):
                        ok = status is ServingStatus.SERVING
                        mark, word = ("+", "ok") if ok else ("-", "failed")
                        lines.append(f"[{mark}]{name.removeprefix(CHECK_PREFIX)} {word}")
            lines.append(f"{request.path.strip('/')} {'ok' if serving else 'failed'}")
            return web.Response(
                status=200 if serving else 503, text="\n".join(lines) + "\n", headers=_NO_CACHE
            )

        return probe

    def _may_see_checks(self, request: web.Request) -> bool:
        if self._auth is None:
            return True
        return self._auth.allows((key.lower(), value) for key, value in request.headers.items())

    async def _render_metrics(self, request: web.Request) -> web.Response:
        assert self._metrics is not None  # noqa: S101 - the route exists only with metrics
        body, content_type = self._metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def start(self, host: str, port: int) -> int:
        """Listen on *host*:*port* ("" for every interface); return the bound port.

        Raises:
            OSError: the address cannot be listened on.
        """
        self._runner = web.AppRunner(self._application(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host or None, port, reuse_port=False)
        try:
            await site.start()
        except OSError:
            await self.stop()
            raise
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

"""The graceful stop that Kubernetes and load balancers expect."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import grpc

from petsage_grpc.board._status import StatusBoard
from petsage_grpc.services._probe_listener import ProbeListener

__all__ = ["graceful_stop"]

_log = logging.getLogger("petsage_grpc.server")


async def graceful_stop(
    server: grpc.aio.Server | Sequence[grpc.aio.Server],
    board: StatusBoard,
    *,
    drain_seconds: float,
    grace_seconds: float,
    hurry: asyncio.Event | None = None,
    probe_listener: ProbeListener | None = None,
) -> None:
    """Drain, end Watch streams, then stop *server*, in that order.

    1. ``board.drain()``: ``readiness``, ``""``, the smoke test and every other name
       report NOT_SERVING at once (watchers see it); ``liveness`` stays SERVING, so the
       kubelet does not restart a pod that is shutting down cleanly.
    2. For *drain_seconds* the server keeps answering, so that readiness probes and
       load balancers notice and move traffic away.
    3. ``board.close_watches()``: every Watch stream ends with OK, which clients treat
       as "retry elsewhere", instead of holding the stop for the whole grace period.
    4. ``server.stop(grace_seconds)``: new calls are refused; calls in flight get up
       to *grace_seconds* to finish, then are cancelled.

    *server* may be several servers that answer from the same board (for example a
    TLS port and a plaintext probe port); they are stopped together.

    A *probe_listener* answers from the same board throughout (readiness NOT_SERVING,
    liveness kept) and stops last, once every server has stopped: the kubelet never
    meets a refused connection while the pod stops cleanly.

    Setting *hurry* (for example on a second SIGTERM) cuts the drain wait and the
    grace period short.
    """
    servers = [server] if isinstance(server, grpc.aio.Server) else list(server)
    board.drain()
    _log.info(
        "draining for %gs, then stopping with %gs grace",
        drain_seconds,
        grace_seconds,
        extra={"event": "draining"},
    )
    hurried = asyncio.Event() if hurry is None else hurry
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hurried.wait(), timeout=drain_seconds)
    board.close_watches()
    stopping = asyncio.ensure_future(_stop_all(servers, grace_seconds))
    hurried_wait = asyncio.ensure_future(hurried.wait())
    await asyncio.wait({stopping, hurried_wait}, return_when=asyncio.FIRST_COMPLETED)
    if not stopping.done():
        await _stop_all(servers, 0)
    hurried_wait.cancel()
    await stopping
    if probe_listener is not None:
        _log.info(
            "servers stopped; stopping the probe listener", extra={"event": "servers_stopped"}
        )
        await probe_listener.stop(0)
    board.shutdown()


async def _stop_all(servers: Sequence[grpc.aio.Server], grace: float) -> None:
    await asyncio.gather(*(server.stop(grace) for server in servers))

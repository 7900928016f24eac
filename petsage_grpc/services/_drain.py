"""The graceful stop that Kubernetes and load balancers expect."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from petsage_grpc.board._status import StatusBoard
from petsage_grpc.services._probe_listener import ProbeListener

__all__ = ["graceful_stop"]

_log = logging.getLogger("petsage_grpc.server")


async def graceful_stop(
    server: grpc.aio.Server,
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

    A *probe_listener* answers from the same board throughout (readiness NOT_SERVING,
    liveness kept) and stops last, once the server has stopped: the kubelet never
    meets a refused connection while the pod stops cleanly.

    Setting *hurry* (for example on a second SIGTERM) cuts the drain wait and the
    grace period short.
    """
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
    stopping = asyncio.ensure_future(server.stop(grace_seconds))
    hurried_wait = asyncio.ensure_future(hurried.wait())
    await asyncio.wait({stopping, hurried_wait}, return_when=asyncio.FIRST_COMPLETED)
    if not stopping.done():
        await server.stop(0)
    hurried_wait.cancel()
    await stopping
    if probe_listener is not None:
        _log.info("server stopped; stopping the probe listener", extra={"event": "servers_stopped"})
        await probe_listener.stop(0)
    board.shutdown()

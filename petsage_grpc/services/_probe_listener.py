"""The probe listener: Health's Check and Watch on a port of their own, off the event loop.

Embedded in a backend, the health service shares the application's ``grpc.aio`` event
loop: while the application's own calls keep that loop busy, a probe waits behind them,
and the kubelet restarts a pod that is only busy. The probe listener answers from
grpcio's synchronous server, whose completion queue and worker threads are its own, so
a probe is answered in milliseconds however busy (or blocked) the loop is.

Why grpcio's synchronous server and not a second ``grpc.aio`` server on a loop of its
own: grpc.aio has one completion-queue poller per process, and how it hands events to
a second loop has changed from release to release; measured with grpcio 1.85 while the
main loop burnt CPU in 20 ms slices, a ``grpc.aio`` Health server on its own thread and
loop answered in 20 ms (p50, one slice) and the synchronous server in 8 ms
(docs/design.md).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from petsage_grpc.board._heartbeat import DEFAULT_STALL_SECONDS, LoopHeartbeat
from petsage_grpc.board._status import StatusBoard
from petsage_grpc.services._health import HEALTH_SERVICE, RESPONSES

__all__ = ["ProbeListener"]

_log = logging.getLogger("petsage_grpc.server")

_CHECK_THREADS: Final = 8
"""Worker threads beside those that Watch streams may hold: Check answers in microseconds."""
_PROBE_SERVER_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 1024),
    ("grpc.max_concurrent_streams", 16),
    # A call that never sends its request holds a worker thread; every connection (the
    # kubelet opens one per probe) is closed within 35 s, which bounds that.
    ("grpc.max_connection_idle_ms", 10_000),
    ("grpc.max_connection_age_ms", 30_000),
    ("grpc.max_connection_age_grace_ms", 5_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
)


class _ProbeServicer:
    """Check and Watch for the synchronous server: every call runs on a worker thread."""

    def __init__(self, board: StatusBoard, *, max_watch_streams: int, max_name: int) -> None:
        self._board = board
        self._max_name = max_name
        self._watch_places = threading.BoundedSemaphore(max_watch_streams)

    def _service_name(self, request: bytes, context: grpc.ServicerContext) -> str:
        try:
            service = health_pb2.HealthCheckRequest.FromString(request).service
        except DecodeError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed HealthCheckRequest")
        if len(service) > self._max_name:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"service name longer than {self._max_name} characters",
            )
        return service

    def check(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        status = self._board.get(self._service_name(request, context))
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return RESPONSES[status]

    def watch(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        service = self._service_name(request, context)
        # Each stream holds a worker thread: a few only, so Check always finds one.
        if not self._watch_places.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many Watch streams")
        try:
            watcher = self._board.subscribe_thread(service)
            if watcher is None:
                return  # the server is stopping
            try:
                # Cancelled, past its deadline or stopped: the thread stops waiting at once.
                context.add_callback(watcher.stop)
                status = None
                while (status := watcher.next(status)) is not None:
                    yield RESPONSES[status]
            finally:
                self._board.unsubscribe(service, watcher)
        finally:
            self._watch_places.release()


class ProbeListener:
    """Health's Check and Watch on a plaintext port of their own, answered off the event loop.

    For an embedding backend: point the kubelet's probes at this port, and they are
    answered in milliseconds however busy the application's ``grpc.aio`` loop is, from
    the same board as :func:`~petsage_grpc.add_to_server`'s services. With
    *stall_seconds*, a heartbeat on the application's loop proves the loop runs: when it
    has not run for longer than that, ``liveness`` reports NOT_SERVING (everywhere the
    board is seen), and SERVING again once it runs.

    Start it on the application's event loop, with the application's server, and stop
    it after that server (:func:`~petsage_grpc.graceful_stop` does both, in that order)::

        async with ProbeListener(board, port=8081):
            await server.start()
            ...

    Other Health methods (List), SmokeTest and reflection are not served here. Watch
    streams hold one worker thread each, so there are only *max_watch_streams* of them;
    one more is refused with RESOURCE_EXHAUSTED.
    """

    def __init__(
        self,
        board: StatusBoard,
        *,
        port: int,
        host: str = "",
        stall_seconds: float | None = DEFAULT_STALL_SECONDS,
        shed_lag_seconds: float | None = None,
        max_watch_streams: int = 8,
        max_service_name_length: int = 256,
    ) -> None:
        """Prepare a listener on *host*:*port* ("" every interface; port 0 picks one).

        Args:
            board: The status board to answer from (``add_to_server``'s).
            port: TCP port; 0 picks a free one (see :attr:`port` once started).
            host: Address to listen on; "" means every interface.
            stall_seconds: ``liveness`` reports NOT_SERVING once the event loop that
                :meth:`start` runs on has not run for this long; None: no heartbeat, and
                ``liveness`` is left to the application.
            shed_lag_seconds: With the heartbeat, ``readiness`` and ``""`` also report
                NOT_SERVING while the loop runs this late (3 beats in a row), until it
                runs under half of it (5 beats in a row); None (the default): off.
            max_watch_streams: Open Watch streams on this port, at most.
            max_service_name_length: Longer names are refused with INVALID_ARGUMENT.

        Raises:
            ValueError: an option is out of range.
        """
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0-65535, not {port}")
        if max_watch_streams < 1 or max_service_name_length < 1:
            raise ValueError("max_watch_streams and max_service_name_length must be at least 1")
        self._board = board
        self._host = host
        self._requested_port = port
        self._servicer = _ProbeServicer(
            board, max_watch_streams=max_watch_streams, max_name=max_service_name_length
        )
        self._threads = max_watch_streams + _CHECK_THREADS
        self.heartbeat = (
            None
            if stall_seconds is None
            else LoopHeartbeat(
                board, stall_seconds=stall_seconds, shed_lag_seconds=shed_lag_seconds
            )
        )
        """The loop's heartbeat (its lag and stalls), or None without *stall_seconds*."""
        self._server: grpc.Server | None = None
        self._port = 0

    @property
    def port(self) -> int:
        """The port listened on; 0 before :meth:`start`."""
        return self._port

    async def start(self) -> int:
        """Listen, answer from a thread of its own, and start the heartbeat; return the port.

        Call it on the application's event loop: that is the loop the heartbeat watches.

        Raises:
            OSError: the address cannot be listened on.
            RuntimeError: it is started already.
        """
        if self._server is not None:
            raise RuntimeError("the probe listener is started already")
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="petsage-probe"),
            options=_PROBE_SERVER_OPTIONS,
            maximum_concurrent_rpcs=self._threads * 4,
        )
        methods: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
            "Check": grpc.unary_unary_rpc_method_handler(self._servicer.check),
            "Watch": grpc.unary_stream_rpc_method_handler(self._servicer.watch),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(HEALTH_SERVICE, methods),)
        )
        server.add_registered_method_handlers(HEALTH_SERVICE, methods)
        host = self._host or "[::]"
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        try:
            self._port = server.add_insecure_port(f"{host}:{self._requested_port}")
        except RuntimeError:
            raise OSError(f"cannot listen on {host}:{self._requested_port}") from None
        server.start()
        self._server = server
        if self.heartbeat is not None:
            self.heartbeat.start()
        return self._port

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Stop the heartbeat, then stop listening; calls in flight get *grace_seconds*.

        ``liveness`` keeps whatever it reports. Safe to call more than once.
        """
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        server, self._server = self._server, None
        if server is not None:
            stopped = server.stop(grace_seconds)
            await asyncio.to_thread(stopped.wait)

    async def __aenter__(self) -> ProbeListener:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

"""``grpc.health.v1.Health`` (Check, Watch, List): a thin adapter over the status board.

The handlers take the raw request bytes and return pre-serialized responses, so the
Check hot path is one protobuf parse and one dict lookup. The messages come from
grpcio-health-checking's ``health_pb2``, the one copy of health.proto in the process.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from petsage_grpc.board._status import ServingStatus, StatusBoard
from petsage_grpc.services._auth import UNAUTHENTICATED_DETAILS, BearerToken
from petsage_grpc.services._registration import RequestGate, register_service

__all__ = ["HEALTH_SERVICE", "RESPONSES", "HealthLimits", "add_health_service"]

HEALTH_SERVICE: Final = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

RESPONSES: Final = {  # pre-serialized answers, by status
    status: health_pb2.HealthCheckResponse(status=status.name).SerializeToString()
    for status in ServingStatus
}
_NO_COMPRESSION: Final = grpc.Compression.NoCompression


@dataclass(frozen=True, kw_only=True)
class HealthLimits:
    """Caps that keep one client from holding the health service's resources."""

    list_limit: int = 100
    """List answers RESOURCE_EXHAUSTED above this many names, as grpc-go and grpc-js do."""
    max_service_name_length: int = 256
    """Longer names are refused with INVALID_ARGUMENT (a Watch would otherwise hold them)."""
    max_watch_streams: int = 50_000
    """Open Watch streams in all; one more is refused with RESOURCE_EXHAUSTED."""
    max_watch_streams_per_connection: int = 1_000
    """Open Watch streams on one connection (clients need one per service they follow)."""
    max_calls_awaiting_request: int = 2_000
    """Calls (of every service) waiting for their request message; one more ends the
    oldest with RESOURCE_EXHAUSTED. Clients send the message with the call, so only a
    client that holds calls open on purpose ever meets it."""
    request_timeout_seconds: float = 10.0
    """A call whose request message has not come this long after it began ends with
    DEADLINE_EXCEEDED."""

    def __post_init__(self) -> None:
        for name in (
            "list_limit",
            "max_service_name_length",
            "max_watch_streams",
            "max_watch_streams_per_connection",
            "max_calls_awaiting_request",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not self.request_timeout_seconds > 0:
            raise ValueError(
                f"request_timeout_seconds must be above 0, not {self.request_timeout_seconds}"
            )

    def request_gate(self) -> RequestGate:
        """A new gate for one server's calls that wait for their request message."""
        return RequestGate(
            max_waiting=self.max_calls_awaiting_request, timeout=self.request_timeout_seconds
        )


class _BadRequestError(Exception):
    pass


class _HealthServicer:
    def __init__(
        self,
        board: StatusBoard,
        limits: HealthLimits,
        auth: BearerToken | None,
        gate: RequestGate,
        admit_watch: Callable[[], bool] | None,
    ) -> None:
        self._board = board
        self._limits = limits
        self._auth = auth
        self._gate = gate
        self._admit_watch = admit_watch
        self._watches = 0
        self._watches_by_peer: Counter[str] = Counter()

    def _service_name(self, request: bytes) -> str:
        """The requested name; raises _BadRequestError for a request to refuse."""
        try:
            service = health_pb2.HealthCheckRequest.FromString(request).service
        except DecodeError:
            raise _BadRequestError("malformed HealthCheckRequest") from None
        if len(service) > self._limits.max_service_name_length:
            raise _BadRequestError(
                f"service name longer than {self._limits.max_service_name_length} characters"
            )
        return service

    async def check(
        self, requests: object, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        request = await self._gate.read(context)
        # Envoy fails a health check whose response frame is compressed. For unary calls
        # grpc.aio ignores set_compression(), so the message itself is exempted.
        context.disable_next_message_compression()
        try:
            status = self._board.get(self._service_name(request))
        except _BadRequestError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return RESPONSES[status]

    async def watch(
        self, requests: object, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        request = await self._gate.read(context)
        context.set_compression(_NO_COMPRESSION)
        try:
            service = self._service_name(request)
        except _BadRequestError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        # Interned: every stream of a connection then holds the one copy of its peer
        # string, the one that also keys the per-connection count.
        peer = sys.intern(context.peer())
        if self._watches >= self._limits.max_watch_streams:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many Watch streams")
        if self._watches_by_peer[peer] >= self._limits.max_watch_streams_per_connection:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "too many Watch streams on this connection"
            )
        if self._admit_watch is not None and not self._admit_watch():
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the server is short of memory")
        watcher = self._board.subscribe(service)
        if watcher is None:
            return  # the server is stopping
        self._watches += 1
        self._watches_by_peer[peer] += 1
        try:
            # The board's watcher, not its watch() generator: one generator per stream
            # (this one) instead of two.
            status: ServingStatus | None = None
            while (status := await watcher.next(status)) is not None:
                yield RESPONSES[status]
        finally:
            self._board.unsubscribe(service, watcher)
            self._watches -= 1
            self._watches_by_peer[peer] -= 1
            if not self._watches_by_peer[peer]:
                del self._watches_by_peer[peer]

    async def list(
        self, requests: object, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        request = await self._gate.read(context)
        context.disable_next_message_compression()
        if self._auth is not None and not self._auth.allows(context.invocation_metadata()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)
        try:
            health_pb2.HealthListRequest.FromString(request)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed HealthListRequest")
        snapshot = self._board.snapshot()
        if len(snapshot) > self._limits.list_limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server health list exceeds maximum capacity: {self._limits.list_limit}",
            )
        response = health_pb2.HealthListResponse()
        for name, status in snapshot.items():
            response.statuses[name].status = status.name  # type: ignore[assignment]
        return response.SerializeToString()


def add_health_service(
    server: grpc.aio.Server,
    board: StatusBoard,
    *,
    limits: HealthLimits | None = None,
    auth: BearerToken | None = None,
    gate: RequestGate | None = None,
    admit_watch: Callable[[], bool] | None = None,
) -> None:
    """Register ``grpc.health.v1.Health`` on *server*, answering from *board*.

    With *auth*, List requires the bearer token; Check and Watch never do. *admit_watch*, if given,
    is asked before each new Watch stream; False refuses it (RESOURCE_EXHAUSTED). *gate*
    bounds the calls waiting for their request message (one from *limits* if None).
    """
    limits = limits or HealthLimits()
    servicer = _HealthServicer(board, limits, auth, gate or limits.request_gate(), admit_watch)
    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        # Streaming on the server side only: see RequestGate. Clients see unary calls.
        "Check": grpc.stream_unary_rpc_method_handler(servicer.check),
        "Watch": grpc.stream_stream_rpc_method_handler(servicer.watch),
        "List": grpc.stream_unary_rpc_method_handler(servicer.list),
    }
    register_service(server, HEALTH_SERVICE, handlers)

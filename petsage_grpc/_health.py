"""``grpc.health.v1.Health`` (Check, Watch, List): a thin adapter over the status board.

The handlers take the raw request bytes and return pre-serialized responses, so the
Check hot path is one protobuf parse and one dict lookup. The messages come from
grpcio-health-checking's ``health_pb2``, the one copy of health.proto in the process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from petsage_grpc._registration import register_service
from petsage_grpc._status import ServingStatus, StatusBoard

__all__ = ["DEFAULT_LIST_LIMIT", "HEALTH_SERVICE", "add_health_service"]

HEALTH_SERVICE: Final = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
DEFAULT_LIST_LIMIT: Final = 100
"""List answers RESOURCE_EXHAUSTED above this many names, as grpc-go and grpc-js do."""

_RESPONSES: Final = {
    status: health_pb2.HealthCheckResponse(status=status.name).SerializeToString()
    for status in ServingStatus
}
_NO_COMPRESSION: Final = grpc.Compression.NoCompression


def _service_name(request: bytes) -> str:
    return health_pb2.HealthCheckRequest.FromString(request).service


class _HealthServicer:
    def __init__(self, board: StatusBoard, *, list_limit: int) -> None:
        self._board = board
        self._list_limit = list_limit

    async def check(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        # Envoy fails a health check whose response frame is compressed. For unary calls
        # grpc.aio ignores set_compression(), so the message itself is exempted.
        context.disable_next_message_compression()
        try:
            service = _service_name(request)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed HealthCheckRequest")
        status = self._board.get(service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return _RESPONSES[status]

    async def watch(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        context.set_compression(_NO_COMPRESSION)
        try:
            service = _service_name(request)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed HealthCheckRequest")
        async for status in self._board.watch(service):
            yield _RESPONSES[status]

    async def list(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        context.disable_next_message_compression()
        try:
            health_pb2.HealthListRequest.FromString(request)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed HealthListRequest")
        snapshot = self._board.snapshot()
        if len(snapshot) > self._list_limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server health list exceeds maximum capacity: {self._list_limit}",
            )
        response = health_pb2.HealthListResponse()
        for name, status in snapshot.items():
            response.statuses[name].status = status.name  # type: ignore[assignment]
        return response.SerializeToString()


def add_health_service(
    server: grpc.aio.Server, board: StatusBoard, *, list_limit: int = DEFAULT_LIST_LIMIT
) -> None:
    """Register ``grpc.health.v1.Health`` on *server*, answering from *board*."""
    servicer = _HealthServicer(board, list_limit=list_limit)
    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        "Check": grpc.unary_unary_rpc_method_handler(servicer.check),
        "Watch": grpc.unary_stream_rpc_method_handler(servicer.watch),
        "List": grpc.unary_unary_rpc_method_handler(servicer.list),
    }
    register_service(server, HEALTH_SERVICE, handlers)

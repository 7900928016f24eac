"""``petsage.v1.SmokeTestService``: answers from the status board's SmokeTest entry."""

from __future__ import annotations

from typing import Final

import grpc
from google.protobuf.message import DecodeError

from petsage_grpc._generated.petsage.v1 import smoke_test_service_pb2
from petsage_grpc._registration import register_service
from petsage_grpc._status import SMOKE_TEST_SERVICE, ServingStatus, StatusBoard

__all__ = ["SMOKE_TEST_MESSAGE", "add_smoke_test_service"]

SMOKE_TEST_MESSAGE: Final = "PetSage system is alive and purring."
# Public: the refusal is fixed text that names no host, dependency or error.
_NOT_SERVING_DETAILS: Final = "PetSage is not serving right now"
_OK: Final = smoke_test_service_pb2.SmokeTestResponse(
    status="ok", message=SMOKE_TEST_MESSAGE
).SerializeToString()

_SERVICE_NAME: Final = smoke_test_service_pb2.DESCRIPTOR.services_by_name[
    "SmokeTestService"
].full_name
assert _SERVICE_NAME == SMOKE_TEST_SERVICE  # noqa: S101 - the proto and the board must agree


class _SmokeTestServicer:
    def __init__(self, board: StatusBoard) -> None:
        self._board = board

    async def smoke_test(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        try:
            smoke_test_service_pb2.SmokeTestRequest.FromString(request)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed SmokeTestRequest")
        if self._board.get(SMOKE_TEST_SERVICE) is not ServingStatus.SERVING:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _NOT_SERVING_DETAILS)
        return _OK


def add_smoke_test_service(server: grpc.aio.Server, board: StatusBoard) -> None:
    """Register ``petsage.v1.SmokeTestService`` on *server*, answering from *board*."""
    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        "SmokeTest": grpc.unary_unary_rpc_method_handler(_SmokeTestServicer(board).smoke_test),
    }
    register_service(server, SMOKE_TEST_SERVICE, handlers)

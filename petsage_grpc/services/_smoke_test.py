"""``petsage.v1.SmokeTestService``: answers from the status board's SmokeTest entry."""

from __future__ import annotations

from typing import Final

import grpc
from google.protobuf.message import DecodeError

from petsage_grpc._generated.petsage.v1 import smoke_test_service_pb2
from petsage_grpc.board._check import CHECK_PREFIX
from petsage_grpc.board._status import SMOKE_TEST_SERVICE, ServingStatus, StatusBoard
from petsage_grpc.services._auth import BearerToken
from petsage_grpc.services._registration import RequestGate, register_service

__all__ = [
    "DRAINING_DETAILS",
    "NOT_SERVING_DETAILS",
    "SMOKE_TEST_MESSAGE",
    "add_smoke_test_service",
    "check_states",
]

SMOKE_TEST_MESSAGE: Final = "PetSage system is alive and purring."
# Public: the refusal is fixed text that names no host, dependency or error.
NOT_SERVING_DETAILS: Final = "PetSage is not serving right now"
# While draining: tells a follower (the fleet view) a replica on its way out from one
# whose dependency failed, which the health statuses alone cannot when every check fails.
DRAINING_DETAILS: Final = "PetSage is draining"

_SERVICE_NAME: Final = smoke_test_service_pb2.DESCRIPTOR.services_by_name[
    "SmokeTestService"
].full_name
assert _SERVICE_NAME == SMOKE_TEST_SERVICE  # noqa: S101 - the proto and the board must agree


def check_states(board: StatusBoard) -> dict[str, bool]:
    """Each dependency check on *board* (``check.<name>``): its name and whether it passes."""
    return {
        name.removeprefix(CHECK_PREFIX): status is ServingStatus.SERVING
        for name, status in board.snapshot().items()
        if name.startswith(CHECK_PREFIX)
    }


def _answer(checks: dict[str, bool], loop_lag: float | None = None) -> bytes:
    response = smoke_test_service_pb2.SmokeTestResponse(status="ok", message=SMOKE_TEST_MESSAGE)
    for name in sorted(checks):
        response.checks.add(name=name, serving=checks[name])
    if loop_lag is not None:
        response.event_loop_lag_seconds = round(loop_lag, 4)
    return response.SerializeToString()


class _SmokeTestServicer:
    def __init__(
        self,
        board: StatusBoard,
        *,
        report_checks: bool,
        auth: BearerToken | None,
        gate: RequestGate,
    ) -> None:
        self._board = board
        self._gate = gate
        self._report_checks = report_checks
        self._auth = auth
        self._plain = _answer({})

    async def smoke_test(
        self, requests: object, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        request = await self._gate.read(context)
        try:
            smoke_test_service_pb2.SmokeTestRequest.FromString(request)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed SmokeTestRequest")
        if self._board.get(SMOKE_TEST_SERVICE) is not ServingStatus.SERVING:
            details = DRAINING_DETAILS if self._board.draining else NOT_SERVING_DETAILS
            await context.abort(grpc.StatusCode.UNAVAILABLE, details)
        if not self._report_checks:
            return self._plain
        if self._auth is not None and not self._auth.allows(context.invocation_metadata()):
            return self._plain
        checks = check_states(self._board)
        lag = self._board.loop_lag_seconds
        return _answer(checks, lag) if checks or lag is not None else self._plain


def add_smoke_test_service(
    server: grpc.aio.Server,
    board: StatusBoard,
    *,
    report_checks: bool = True,
    auth: BearerToken | None = None,
    gate: RequestGate,
) -> None:
    """Register ``petsage.v1.SmokeTestService`` on *server*, answering from *board*.

    With *report_checks*, a serving answer lists each dependency check (``check.<name>``
    on the board) by name with its state, and the event loop's lag while a loop
    heartbeat runs on the board; without, it lists neither. With *auth*, the list
    is given only to callers that send the bearer token; others get the plain answer.
    *gate* bounds the calls waiting for their request message.
    """
    servicer = _SmokeTestServicer(board, report_checks=report_checks, auth=auth, gate=gate)
    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        "SmokeTest": grpc.stream_unary_rpc_method_handler(servicer.smoke_test),
    }
    register_service(server, SMOKE_TEST_SERVICE, handlers)

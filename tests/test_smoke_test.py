"""petsage.v1.SmokeTestService/SmokeTest on a real in-process server, via the generated stub."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, TypeAlias

import grpc
import pytest
from conftest import InProcessServer

from petsage_grpc import READINESS, SMOKE_TEST_SERVICE, ServingStatus
from petsage_grpc._generated.petsage.v1 import smoke_test_service_pb2, smoke_test_service_pb2_grpc
from petsage_grpc.services._smoke_test import (
    DRAINING_DETAILS,
    NOT_SERVING_DETAILS,
    SMOKE_TEST_MESSAGE,
)

RPC_TIMEOUT: Final = 5.0
OK_MESSAGE: Final = "PetSage system is alive and purring."

SmokeTest: TypeAlias = (
    "grpc.UnaryUnaryMultiCallable[smoke_test_service_pb2.SmokeTestRequest, "
    "smoke_test_service_pb2.SmokeTestResponse]"
)


@pytest.fixture
def smoke_test(channel: grpc.Channel) -> SmokeTest:
    stub = smoke_test_service_pb2_grpc.SmokeTestServiceStub(channel)
    method: SmokeTest = stub.SmokeTest
    return method


def call(smoke_test: SmokeTest) -> smoke_test_service_pb2.SmokeTestResponse:
    return smoke_test(smoke_test_service_pb2.SmokeTestRequest(), timeout=RPC_TIMEOUT)


def refusal(smoke_test: SmokeTest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failure:
        call(smoke_test)
    assert failure.value.code() is grpc.StatusCode.UNAVAILABLE
    return failure.value


def assert_discloses_nothing(error: grpc.RpcError, server: InProcessServer) -> None:
    """The refusal is short, fixed text: no host, port, version, path or exception."""
    details = error.details() or ""
    assert details, "a short human-readable reason is expected"
    assert len(details) <= 80
    assert "\n" not in details
    lowered = details.lower()
    for secret in (
        "127.0.0.1",
        "localhost",
        str(server.port),
        grpc.__version__,
        "python",
        "grpc",
        "/",
        "\\",
        ".py",
        "traceback",
        "exception",
        "error",
        "readiness",
    ):
        assert secret.lower() not in lowered, f"{secret!r} leaked in {details!r}"
    assert not re.search(r"\d+\.\d+", details), f"a version-like string in {details!r}"
    assert not re.search(r":\d{2,5}\b", details), f"a port-like string in {details!r}"
    # Nothing extra rides in the trailers either, beyond what grpcio itself adds.
    extra = [
        item.key for item in error.trailing_metadata() or () if not item.key.startswith("grpc-")
    ]
    assert not extra


def test_smoke_test_ok_while_serving(smoke_test: SmokeTest) -> None:
    response = call(smoke_test)
    assert response.status == "ok"
    assert response.message == OK_MESSAGE
    assert SMOKE_TEST_MESSAGE == OK_MESSAGE


def test_smoke_test_follows_its_own_entry_only(
    server: InProcessServer, smoke_test: SmokeTest
) -> None:
    # Other names do not matter: only petsage.v1.SmokeTestService does.
    server.board.set(READINESS, ServingStatus.NOT_SERVING)
    server.board.set("", ServingStatus.NOT_SERVING)
    assert call(smoke_test).status == "ok"

    server.board.set(SMOKE_TEST_SERVICE, ServingStatus.NOT_SERVING)
    refusal(smoke_test)
    server.board.set(SMOKE_TEST_SERVICE, ServingStatus.SERVING)
    assert call(smoke_test).message == OK_MESSAGE


def _not_serving(server: InProcessServer) -> None:
    server.board.set(SMOKE_TEST_SERVICE, ServingStatus.NOT_SERVING)


def _unknown(server: InProcessServer) -> None:
    server.board.set(SMOKE_TEST_SERVICE, ServingStatus.UNKNOWN)


def _cleared(server: InProcessServer) -> None:
    server.board.clear(SMOKE_TEST_SERVICE)


def _draining(server: InProcessServer) -> None:
    server.board.drain()


def _shut_down(server: InProcessServer) -> None:
    server.board.shutdown()


@pytest.mark.parametrize(
    "make_unavailable",
    [_not_serving, _unknown, _cleared, _draining, _shut_down],
    ids=["not-serving", "unknown", "cleared", "draining", "shut-down"],
)
def test_smoke_test_unavailable_with_a_short_message_that_discloses_nothing(
    server: InProcessServer,
    smoke_test: SmokeTest,
    make_unavailable: Callable[[InProcessServer], None],
) -> None:
    make_unavailable(server)
    error = refusal(smoke_test)
    assert_discloses_nothing(error, server)
    # The refusal is the same fixed text every time.
    assert refusal(smoke_test).details() == error.details()


def test_smoke_test_during_drain_then_resume(
    server: InProcessServer, smoke_test: SmokeTest
) -> None:
    server.board.drain()
    error = refusal(smoke_test)
    assert_discloses_nothing(error, server)
    # Said apart from a failure, for followers such as the fleet view.
    assert error.details() == DRAINING_DETAILS
    server.board.resume()
    assert call(smoke_test).status == "ok"
    server.board.set(SMOKE_TEST_SERVICE, ServingStatus.NOT_SERVING)
    assert refusal(smoke_test).details() == NOT_SERVING_DETAILS


def test_smoke_test_set_while_draining_only_counts_after_resume(
    server: InProcessServer, smoke_test: SmokeTest
) -> None:
    server.board.set(SMOKE_TEST_SERVICE, ServingStatus.NOT_SERVING)
    server.board.drain()
    server.board.set(SMOKE_TEST_SERVICE, ServingStatus.SERVING)
    refusal(smoke_test)
    server.board.resume()
    assert call(smoke_test).status == "ok"


def test_smoke_test_malformed_request_is_invalid_argument(
    channel: grpc.Channel, smoke_test: SmokeTest
) -> None:
    raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/petsage.v1.SmokeTestService/SmokeTest"
    )
    with pytest.raises(grpc.RpcError) as failure:
        raw(b"\x0a\x05ab", timeout=RPC_TIMEOUT)  # a truncated length-delimited field
    assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert call(smoke_test).status == "ok"

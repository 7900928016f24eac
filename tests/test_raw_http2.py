"""Raw HTTP/2 gRPC requests, byte for byte as Envoy's active health checker sends them.

Envoy counts a check as healthy only if the response is HTTP 200, carries exactly one
uncompressed message that parses with status SERVING, and ends with grpc-status 0.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from conftest import InProcessServer
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from petsage_grpc import READINESS, SMOKE_TEST_SERVICE, ServingStatus

IO_TIMEOUT: Final = 30.0
CLUSTER: Final = "petsage-backend-cluster"
CHECK: Final = "/grpc.health.v1.Health/Check"
WATCH: Final = "/grpc.health.v1.Health/Watch"
LIST: Final = "/grpc.health.v1.Health/List"
EMPTY_MESSAGE: Final = b"\x00\x00\x00\x00\x00"  # uncompressed, zero bytes: service=""

Message = tuple[int, bytes]
"""One gRPC length-prefixed message: its compressed-flag byte and its payload."""


def frame(payload: bytes, *, compressed: int = 0) -> bytes:
    """Prefix *payload* the way gRPC frames a message on the wire."""
    return struct.pack(">BI", compressed, len(payload)) + payload


def split_messages(body: bytes) -> list[Message]:
    messages: list[Message] = []
    offset = 0
    while offset < len(body):
        assert len(body) - offset >= 5, f"truncated message prefix in {body!r}"
        flag, length = struct.unpack_from(">BI", body, offset)
        offset += 5
        assert len(body) - offset >= length, f"truncated message in {body!r}"
        messages.append((flag, body[offset : offset + length]))
        offset += length
    return messages


@dataclass
class RawResponse:
    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] | None = None
    body: bytes = b""
    ended: bool = False
    reset_code: int | None = None

    @property
    def grpc_status(self) -> str | None:
        """grpc-status from the trailers, or from the headers of a trailers-only response."""
        if self.trailers is not None:
            return self.trailers.get("grpc-status")
        return self.headers.get("grpc-status")

    @property
    def messages(self) -> list[Message]:
        return split_messages(self.body)


def _decode(headers: list[tuple[bytes, bytes]] | list[tuple[str, str]]) -> dict[str, str]:
    decoded: dict[str, str] = {}
    for name, value in headers:
        key = name.decode() if isinstance(name, bytes) else name
        decoded[key] = value.decode() if isinstance(value, bytes) else value
    return decoded


def grpc_over_h2(
    port: int,
    path: str,
    body: bytes,
    *,
    extra_headers: tuple[tuple[str, str], ...] = (),
    authority: str = CLUSTER,
    end_stream: bool = True,
    stop_after_first_message: bool = False,
) -> RawResponse:
    """One gRPC call over a fresh plain-text HTTP/2 connection, with every wait bounded."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    response = RawResponse()
    deadline = time.monotonic() + IO_TIMEOUT
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        connection.initiate_connection()
        stream = connection.get_next_available_stream_id()
        connection.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", authority),
                (":path", path),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("user-agent", "Envoy/HC"),
                ("grpc-timeout", "1S"),
                *extra_headers,
            ],
        )
        connection.send_data(stream, body, end_stream=end_stream)
        sock.sendall(connection.data_to_send())
        done = False
        while not done:
            assert time.monotonic() < deadline, "no complete response in time"
            data = sock.recv(65536)
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    response.headers = _decode(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    response.body += event.data
                    connection.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, h2.events.TrailersReceived):
                    response.trailers = _decode(event.headers)
                elif isinstance(event, h2.events.StreamEnded):
                    response.ended = True
                    done = True
                elif isinstance(event, h2.events.StreamReset):
                    response.reset_code = int(event.error_code)
                    done = True
                elif isinstance(event, h2.events.ConnectionTerminated):
                    done = True
            if stop_after_first_message and not done and _has_whole_message(response.body):
                connection.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
                done = True
            sock.sendall(connection.data_to_send())
        connection.close_connection()
        sock.sendall(connection.data_to_send())
    return response


def _has_whole_message(body: bytes) -> bool:
    return len(body) >= 5 and len(body) >= 5 + struct.unpack_from(">I", body, 1)[0]


def check_body(service: str) -> bytes:
    return frame(health_pb2.HealthCheckRequest(service=service).SerializeToString())


def assert_single_uncompressed_status(response: RawResponse) -> ServingStatus:
    """What Envoy requires of a health check answer; returns the status it carries."""
    assert response.reset_code is None
    assert response.headers[":status"] == "200"
    assert response.headers["content-type"].startswith("application/grpc")
    # Only the message's own flag byte says whether it is compressed (a grpc-encoding
    # header merely names the algorithm compressed messages would use); Envoy checks it.
    assert response.trailers is not None, "a response with a message must end with trailers"
    assert response.grpc_status == "0"
    assert response.ended
    messages = response.messages
    assert len(messages) == 1, messages
    ((flag, payload),) = messages
    assert flag == 0, "the health response must not be compressed"
    return ServingStatus(health_pb2.HealthCheckResponse.FromString(payload).status)


# -- servers --------------------------------------------------------------------


GZIP_ACCEPTED: Final = (("grpc-accept-encoding", "gzip"),)


@dataclass(frozen=True)
class Target:
    server: InProcessServer
    extra_headers: tuple[tuple[str, str], ...]


@pytest.fixture(params=["plain", "gzip"])
def target(
    request: pytest.FixtureRequest, start_server: Callable[..., InProcessServer]
) -> Iterator[Target]:
    """The default server with Envoy's headers, and a gzip server with gzip accepted."""
    if request.param == "plain":
        yield Target(start_server(), ())
    else:
        yield Target(start_server(compression=grpc.Compression.Gzip), GZIP_ACCEPTED)


# -- Check ------------------------------------------------------------------------


def test_envoy_check_of_the_whole_server(target: Target) -> None:
    response = grpc_over_h2(
        target.server.port, CHECK, EMPTY_MESSAGE, extra_headers=target.extra_headers
    )
    assert assert_single_uncompressed_status(response) is ServingStatus.SERVING
    assert response.messages == [(0, b"\x08\x01")]  # status: SERVING, nothing else


def test_envoy_check_any_authority_is_accepted(target: Target) -> None:
    for authority in ("petsage-backend-cluster", "10.0.0.7:8080", "x"):
        response = grpc_over_h2(
            target.server.port,
            CHECK,
            check_body(READINESS),
            extra_headers=target.extra_headers,
            authority=authority,
        )
        assert assert_single_uncompressed_status(response) is ServingStatus.SERVING


def test_envoy_check_readiness_not_serving(target: Target) -> None:
    target.server.board.set(READINESS, ServingStatus.NOT_SERVING)
    response = grpc_over_h2(
        target.server.port, CHECK, check_body(READINESS), extra_headers=target.extra_headers
    )
    assert assert_single_uncompressed_status(response) is ServingStatus.NOT_SERVING


def test_envoy_check_during_drain(target: Target) -> None:
    target.server.board.drain()
    for service, expected in (
        ("", ServingStatus.NOT_SERVING),
        (READINESS, ServingStatus.NOT_SERVING),
        ("liveness", ServingStatus.SERVING),
        (SMOKE_TEST_SERVICE, ServingStatus.NOT_SERVING),
    ):
        response = grpc_over_h2(
            target.server.port, CHECK, check_body(service), extra_headers=target.extra_headers
        )
        assert assert_single_uncompressed_status(response) is expected, service


def test_envoy_check_unknown_service_is_not_found(target: Target) -> None:
    # The h2load body for service="x" from the reference notes.
    body = bytes.fromhex("00 00000003 0a0178")
    assert body == check_body("x")
    response = grpc_over_h2(target.server.port, CHECK, body, extra_headers=target.extra_headers)
    assert response.headers[":status"] == "200"
    assert response.grpc_status == "5"
    assert response.messages == []
    assert response.ended


def test_malformed_body_is_invalid_argument(target: Target) -> None:
    body = frame(b"\x0a\x05\xff\xfe\xfd\xfc\xfb")
    response = grpc_over_h2(target.server.port, CHECK, body, extra_headers=target.extra_headers)
    assert response.headers[":status"] == "200"
    assert response.grpc_status == "3"
    assert response.messages == []
    # The next check on a new connection is answered normally.
    again = grpc_over_h2(
        target.server.port, CHECK, EMPTY_MESSAGE, extra_headers=target.extra_headers
    )
    assert assert_single_uncompressed_status(again) is ServingStatus.SERVING


# -- List and Watch never compress either -------------------------------------------


@pytest.mark.parametrize("target", ["plain", "gzip"], indirect=True)
def test_list_response_is_never_compressed(target: Target) -> None:
    # Many similar names make a response that gzip would shrink a lot.
    for i in range(80):
        target.server.board.set(
            f"petsage.v1.VeryRepetitiveServiceName{i:03d}", ServingStatus.SERVING
        )
    response = grpc_over_h2(
        target.server.port,
        LIST,
        frame(health_pb2.HealthListRequest().SerializeToString()),
        extra_headers=target.extra_headers,
    )
    assert response.headers[":status"] == "200"
    assert response.grpc_status == "0"
    ((flag, payload),) = response.messages
    assert flag == 0
    listed = health_pb2.HealthListResponse.FromString(payload)
    assert len(listed.statuses) == len(target.server.board)


def test_watch_first_message_is_not_compressed(target: Target) -> None:
    response = grpc_over_h2(
        target.server.port,
        WATCH,
        check_body(READINESS),
        extra_headers=target.extra_headers,
        stop_after_first_message=True,
    )
    assert response.headers[":status"] == "200"
    # Watch honours set_compression(): not even the header announces gzip.
    assert response.headers.get("grpc-encoding", "identity") == "identity"
    ((flag, payload),) = response.messages
    assert flag == 0
    status = health_pb2.HealthCheckResponse.FromString(payload).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_gzip_server_does_compress_what_health_does_not(
    start_server: Callable[..., InProcessServer],
) -> None:
    """The control for the tests above: the gzip server really compresses other responses."""
    request = reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="grpc.reflection.v1alpha.ServerReflection"
    )
    server = start_server(compression=grpc.Compression.Gzip)
    response = grpc_over_h2(
        server.port,
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        frame(request.SerializeToString()),
        extra_headers=GZIP_ACCEPTED,
    )
    assert response.headers[":status"] == "200"
    assert response.grpc_status == "0"
    assert response.headers.get("grpc-encoding") == "gzip"
    ((flag, _),) = response.messages
    assert flag == 1

    # On that same server, with the same request headers, Check stays uncompressed.
    check = grpc_over_h2(server.port, CHECK, EMPTY_MESSAGE, extra_headers=GZIP_ACCEPTED)
    assert assert_single_uncompressed_status(check) is ServingStatus.SERVING

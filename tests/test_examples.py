"""The examples in examples/ run as documented.

examples/embed.py is called the way grpcurl calls it: every message type comes from the
server's reflection (``ProtoReflectionDescriptorDatabase`` + ``DescriptorPool`` +
message classes made from the descriptors), never from the example's generated stubs.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Final

import grpc
import pytest
from conftest import ROOT
from dependency_servers import (  # noqa: F401 - fixtures, used by name
    RedisServer,
    free_port,
    redis_server_fixture,
    start_redis_fixture,
)
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from test_reflection import bounded_channel, call_unary, dynamic

from petsage_grpc._generated.petsage.v1 import smoke_test_service_pb2, smoke_test_service_pb2_grpc

EMBED: Final = ROOT / "examples" / "embed.py"
VISIT_SERVICE: Final = "petsage.example.v1.VisitService"
WAIT: Final = 20.0
"""Bound on each wait for a status change (check interval 0.2 s; generous for a loaded machine)."""
HEALTH_STATUS = health_pb2.HealthCheckResponse.ServingStatus


class Example:
    """examples/embed.py as a child process."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(EMBED), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith("listening on "), line + self.stderr()
        self.address = line.split()[-1]

    def stderr(self) -> str:
        if self.process.poll() is None:
            self.process.kill()
        _, err = self.process.communicate(timeout=10)
        return err


@pytest.fixture
def start_example() -> Iterator[Callable[..., Example]]:
    started: list[Example] = []

    def start(*args: str) -> Example:
        started.append(Example(*args))
        return started[-1]

    yield start
    for each in started:
        if each.process.poll() is None:
            each.process.kill()
            each.process.wait(10)


def wait_for(channel: grpc.Channel, service: str, status: int) -> None:
    """Follow Watch on *service* until it reports *status* (bounded by WAIT)."""
    health = health_pb2_grpc.HealthStub(channel)
    stream = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=WAIT)
    try:
        for answer in stream:
            if answer.status == status:
                return
    finally:
        stream.cancel()
    pytest.fail(f"{service!r} never reported {HEALTH_STATUS.Name(status)}")


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


def raw_http(port: int, request: bytes) -> bytes:
    """Send *request* as is and return the whole reply (the server closes after an error)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(request)
        reply = b""
        while chunk := connection.recv(4096):
            reply += chunk
            if len(reply) > 65536:
                break
    return reply


@pytest.mark.slow
def test_embed_example_is_callable_through_reflection_and_follows_its_store(
    start_example: Callable[..., Example], redis_server: RedisServer
) -> None:
    http_port = free_port()
    example = start_example(
        "--port", "0", "--http-port", str(http_port), "--redis", redis_server.url(),
        "--replica", "r1", "--check-interval", "0.2", "--failure-threshold", "1",
    )  # fmt: skip
    with bounded_channel(example.address) as channel:
        wait_for(channel, "readiness", HEALTH_STATUS.SERVING)
        assert http_status(http_port, "/readyz") == 200
        assert http_status(http_port, "/metrics") == 404
        # What HAProxy sends when a check speaks h2 by mistake: 400, no version, no echo.
        reply = raw_http(http_port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert reply.startswith(b"HTTP/1.0 400 "), reply
        assert b"Server: petsage-example\r\n" in reply
        assert b"aiohttp" not in reply.lower()
        assert b"python" not in reply.lower()
        assert b"PRI" not in reply

        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {VISIT_SERVICE, "grpc.health.v1.Health", "petsage.v1.SmokeTestService"} <= services
        pool = descriptor_pool.DescriptorPool(database)
        record = dynamic(pool.FindServiceByName(VISIT_SERVICE), "RecordVisit")
        # int64 is a string in proto3 JSON, as grpcurl prints it.
        assert call_unary(channel, record, pet="rex") == {
            "pet": "rex",
            "visits": "1",
            "replica": "r1",
        }
        assert call_unary(channel, record, pet="rex")["visits"] == "2"
        with pytest.raises(grpc.RpcError) as invalid:
            call_unary(channel, record, pet="")
        assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT

        # The store goes down: calls fail UNAVAILABLE (fixed text), readiness follows.
        redis_server.stop()
        with pytest.raises(grpc.RpcError) as down:
            call_unary(channel, record, pet="rex")
        assert down.value.code() is grpc.StatusCode.UNAVAILABLE
        assert down.value.details() == "visit store unavailable"
        wait_for(channel, "readiness", HEALTH_STATUS.NOT_SERVING)
        assert http_status(http_port, "/readyz") == 503
        assert http_status(http_port, "/livez") == 200

        redis_server.start()
        wait_for(channel, "readiness", HEALTH_STATUS.SERVING)
        assert http_status(http_port, "/readyz") == 200
        assert call_unary(channel, record, pet="rex")["visits"] == "1"  # no persistence

        smoke = smoke_test_service_pb2_grpc.SmokeTestServiceStub(channel)
        answer = smoke.SmokeTest(smoke_test_service_pb2.SmokeTestRequest(), timeout=5)
        assert (answer.status, answer.message) == ("ok", "PetSage system is alive and purring.")

        example.process.send_signal(signal.SIGTERM)
        wait_for(channel, "readiness", HEALTH_STATUS.NOT_SERVING)
        assert http_status(http_port, "/readyz") == 503
    assert example.process.wait(timeout=15) == 0


def test_embed_example_answers_probes_on_its_probe_listener(
    start_example: Callable[..., Example], redis_server: RedisServer
) -> None:
    example = start_example(
        "--port", "0", "--probe-port", "0", "--redis", redis_server.url(),
        "--check-interval", "0.2", "--drain-seconds", "0.2", "--grace-seconds", "0.2",
    )  # fmt: skip
    assert example.process.stdout is not None
    line = example.process.stdout.readline()
    assert line.startswith("probes on "), line + example.stderr()
    with bounded_channel(line.split()[-1]) as channel:
        wait_for(channel, "readiness", HEALTH_STATUS.SERVING)
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=WAIT)
        assert answer.status == HEALTH_STATUS.SERVING
        with pytest.raises(grpc.RpcError) as listed:  # Check and Watch only
            health.List(health_pb2.HealthListRequest(), timeout=WAIT)
        assert listed.value.code() is grpc.StatusCode.UNIMPLEMENTED
    example.process.send_signal(signal.SIGTERM)
    assert example.process.wait(timeout=WAIT) == 0, example.stderr()


def test_embed_example_rejects_a_bad_store_url_in_one_line() -> None:
    finished = subprocess.run(
        [sys.executable, str(EMBED), "--redis", "http://127.0.0.1:1/"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert finished.returncode == 2
    assert finished.stderr.strip().splitlines()[-1] == (
        "embed.py: error: target: expected a redis/rediss/unix:// URL, not 'http://127.0.0.1:1/'"
    )

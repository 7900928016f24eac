"""SmokeTest of ``petsage-grpc serve`` with dependency checks: what the answer lists.

A serving answer lists each check by name and state, sorted, and nothing else about it
(no target, no error); ``[smoke_test] report_checks = false`` hides even the names.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
import pytest
from conftest import ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tcp_listener import TcpListener, free_port

from petsage_grpc._generated.petsage.v1 import smoke_test_service_pb2
from petsage_grpc.services._smoke_test import SMOKE_TEST_MESSAGE

SMOKE_TEST_METHOD: Final = "/petsage.v1.SmokeTestService/SmokeTest"
RPC_TIMEOUT: Final = 5.0
STEP: Final = 60.0
CHECKS_IN_CONFIG_ORDER: Final = ("db-up", "cache-down", "api-up")


@dataclass
class Deployment:
    server: ServerProcess
    listener: TcpListener
    down_port: int

    def secrets(self) -> tuple[str, ...]:
        """What an answer must never show: targets, ports, kinds."""
        return ("127.0.0.1", str(self.listener.port), str(self.down_port), "tcp")


@pytest.fixture
def deploy(
    tmp_path: Path, spawn_server: Callable[..., ServerProcess]
) -> Iterator[Callable[[str], Deployment]]:
    """Start a server whose config has *extra* TOML plus three tcp checks.

    ``db-up`` and ``api-up`` (critical) reach a listener; ``cache-down`` (not critical)
    reaches a closed port.
    """
    with TcpListener() as listener:

        def start(extra: str) -> Deployment:
            down_port = free_port()
            entries = {
                "db-up": (listener.address, True),
                "cache-down": (f"127.0.0.1:{down_port}", False),
                "api-up": (listener.address, True),
            }
            config = tmp_path / "petsage.toml"
            config.write_text(
                extra
                + "".join(
                    f'[[checks]]\nname = "{name}"\nkind = "tcp"\ntarget = "{target}"\n'
                    f'interval = "100ms"\ntimeout = "500ms"\ncritical = {str(critical).lower()}\n'
                    for name, (target, critical) in entries.items()
                ),
                encoding="utf-8",
            )
            assert tuple(entries) == CHECKS_IN_CONFIG_ORDER
            return Deployment(spawn_server("--config", str(config)), listener, down_port)

        yield start


def smoke_test_raw(channel: grpc.Channel) -> bytes:
    """Call SmokeTest and return the response bytes exactly as sent."""
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(SMOKE_TEST_METHOD)
    return call(smoke_test_service_pb2.SmokeTestRequest().SerializeToString(), timeout=RPC_TIMEOUT)


def smoke_test_when_serving(channel: grpc.Channel, until: Callable[[bytes], bool]) -> bytes:
    """Call SmokeTest until it answers OK and *until* holds for the answer; fail after STEP."""
    deadline = time.monotonic() + STEP
    last: str = "no answer"
    while time.monotonic() < deadline:
        try:
            raw = smoke_test_raw(channel)
        except grpc.RpcError as error:
            if error.code() is not grpc.StatusCode.UNAVAILABLE:
                pytest.fail(f"SmokeTest failed with {error.code()}: {error.details()}")
            last = f"UNAVAILABLE: {error.details()}"
        else:
            if until(raw):
                return raw
            last = repr(smoke_test_service_pb2.SmokeTestResponse.FromString(raw))
        time.sleep(0.02)
    pytest.fail(f"SmokeTest did not settle within {STEP}s; last: {last}")


def listed(raw: bytes) -> list[tuple[str, bool]]:
    response = smoke_test_service_pb2.SmokeTestResponse.FromString(raw)
    return [(check.name, check.serving) for check in response.checks]


def test_serving_answer_lists_checks_by_name_and_state_sorted(
    deploy: Callable[[str], Deployment],
) -> None:
    deployment = deploy("")
    expected = [("api-up", True), ("cache-down", False), ("db-up", True)]
    with grpc.insecure_channel(deployment.server.address) as channel:
        raw = smoke_test_when_serving(channel, lambda raw: listed(raw) == expected)
    response = smoke_test_service_pb2.SmokeTestResponse.FromString(raw)
    assert (response.status, response.message) == ("ok", SMOKE_TEST_MESSAGE)
    assert [name for name, _ in expected] == sorted(CHECKS_IN_CONFIG_ORDER)
    # Names and states only: no target, port or kind anywhere in the answer.
    for secret in deployment.secrets():
        assert secret.encode() not in raw, secret
    for check in response.checks:
        assert {field.name for field, _ in check.ListFields()} <= {"name", "serving"}


def test_report_checks_false_hides_even_the_names(deploy: Callable[[str], Deployment]) -> None:
    deployment = deploy("[smoke_test]\nreport_checks = false\n")
    plain = smoke_test_service_pb2.SmokeTestResponse(
        status="ok", message=SMOKE_TEST_MESSAGE
    ).SerializeToString()
    with grpc.insecure_channel(deployment.server.address) as channel:
        raw = smoke_test_when_serving(channel, lambda raw: True)
        # The checks do run (and are on the board): SmokeTest just does not list them.
        health = health_pb2_grpc.HealthStub(channel)
        for name, status in (
            ("check.db-up", health_pb2.HealthCheckResponse.SERVING),
            ("check.cache-down", health_pb2.HealthCheckResponse.NOT_SERVING),
        ):
            answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT)
            assert answer.status == status, name
    assert raw == plain
    assert listed(raw) == []
    for name in CHECKS_IN_CONFIG_ORDER:
        assert name.encode() not in raw


def test_refusal_names_no_check_while_a_critical_one_fails(
    tmp_path: Path, spawn_server: Callable[..., ServerProcess]
) -> None:
    config = tmp_path / "petsage.toml"
    config.write_text(
        '[[checks]]\nname = "db-down"\nkind = "tcp"\n'
        f'target = "127.0.0.1:{free_port()}"\ninterval = "100ms"\ntimeout = "500ms"\n',
        encoding="utf-8",
    )
    server = spawn_server("--config", str(config))
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + STEP
        while "check 'db-down' failed" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.02)
        answer = health.Check(health_pb2.HealthCheckRequest(service="check.db-down"), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as failure:
            smoke_test_raw(channel)
    assert failure.value.code() is grpc.StatusCode.UNAVAILABLE
    details = failure.value.details() or ""
    assert details
    assert "db-down" not in details
    assert "127.0.0.1" not in details

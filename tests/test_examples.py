"""The examples in examples/ run as documented."""

from __future__ import annotations

import signal
import subprocess
import sys

import grpc
from conftest import ROOT
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petsage_grpc._generated.petsage.v1 import smoke_test_service_pb2, smoke_test_service_pb2_grpc


def test_embed_example_serves_health_smoke_test_and_its_own_service() -> None:
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "embed.py"), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on "), line + (
            process.stderr.read() if process.stderr else ""
        )
        address = line.split()[-1]
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", "liveness", "readiness", "petsage.example.v1.EchoService"):
                response = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert response.status == health_pb2.HealthCheckResponse.SERVING, name
            smoke = smoke_test_service_pb2_grpc.SmokeTestServiceStub(channel)
            answer = smoke.SmokeTest(smoke_test_service_pb2.SmokeTestRequest(), timeout=5)
            assert (answer.status, answer.message) == ("ok", "PetSage system is alive and purring.")
            echo: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/petsage.example.v1.EchoService/Echo"
            )
            assert echo(b"purr", timeout=5) == b"purr"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)

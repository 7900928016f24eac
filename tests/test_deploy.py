"""deploy/kubernetes.yaml: the server started as the manifest starts it answers every probe."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import yaml
from conftest import ROOT, ServerProcess
from grpc_health.v1 import health_pb2

PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


def _containers() -> Iterator[dict[str, Any]]:
    with (ROOT / "deploy" / "kubernetes.yaml").open() as file:
        for document in yaml.safe_load_all(file):
            if document and document["kind"] == "Deployment":
                yield from document["spec"]["template"]["spec"]["containers"]


def _kubelet_check(address: str, service: str) -> int:
    """One probe as the kubelet makes it: a new connection, 1 s for dial + Check."""
    options = (("grpc.primary_user_agent", "kube-probe/1.31"),)
    with grpc.insecure_channel(address, options=options) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        response = check(
            health_pb2.HealthCheckRequest(service=service), timeout=1, wait_for_ready=True
        )
        return int(response.status)


def test_manifest_probes_use_the_served_port_and_registered_names() -> None:
    containers = list(_containers())
    assert containers, "no Deployment container in deploy/kubernetes.yaml"
    for container in containers:
        ports = {port["containerPort"] for port in container["ports"]}
        for kind in PROBES:
            probe = container[kind]["grpc"]
            assert probe["port"] in ports, kind
            assert probe["port"] == 50051, "the server's default port"


def test_server_started_as_in_the_manifest_answers_every_probe(
    spawn_server: Callable[..., ServerProcess],
) -> None:
    (container,) = _containers()
    assert container["args"][0] == "serve"
    env = {item["name"]: item["value"] for item in container.get("env", [])}
    # The manifest's flags and environment, on a free loopback port instead of 50051
    # (flags given by spawn_server win over PETSAGE_GRPC_PORT, as documented).
    running = spawn_server(*container["args"][1:], env=env)
    for kind in PROBES:
        service = container[kind]["grpc"].get("service", "")
        status = _kubelet_check(running.address, service)
        assert status == health_pb2.HealthCheckResponse.SERVING, (kind, service)
    running.signal()
    assert running.wait(timeout=float(env["PETSAGE_GRPC_DRAIN_SECONDS"]) + 10) == 0


def test_termination_grace_period_covers_drain_and_grace() -> None:
    with (ROOT / "deploy" / "kubernetes.yaml").open() as file:
        (deployment,) = (d for d in yaml.safe_load_all(file) if d and d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {
        item["name"]: float(item["value"]) for item in container["env"] if "SECONDS" in item["name"]
    }
    budget = env["PETSAGE_GRPC_DRAIN_SECONDS"] + env["PETSAGE_GRPC_GRACE_SECONDS"]
    assert pod["terminationGracePeriodSeconds"] > budget

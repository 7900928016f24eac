"""deploy/kubernetes.yaml: the server started as the manifest starts it answers every probe.

The manifest's ConfigMap, environment and probes are used as written; only what cannot
exist here changes: the dependencies' addresses point at real local PostgreSQL and Redis
servers, and the ports are free loopback ports instead of 50051 and 8080.
"""

from __future__ import annotations

import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import tomli_w
import yaml
from conftest import ROOT, ServerProcess
from dependency_servers import (  # noqa: F401 - the fixtures are used by name
    AUTH_ROLE,
    PostgresCluster,
    PostgresServer,
    RedisServer,
    free_port,
    postgres_cluster_fixture,
    postgres_server_fixture,
    redis_server_fixture,
    start_redis_fixture,
)
from grpc_health.v1 import health_pb2

PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
MANIFEST = ROOT / "deploy" / "kubernetes.yaml"


def _documents() -> list[dict[str, Any]]:
    with MANIFEST.open() as file:
        return [d for d in yaml.safe_load_all(file) if d]


def _one(kind: str) -> dict[str, Any]:
    (document,) = (d for d in _documents() if d["kind"] == kind)
    return document


def _containers() -> Iterator[dict[str, Any]]:
    yield from _one("Deployment")["spec"]["template"]["spec"]["containers"]


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
    (container,) = _containers()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["grpc"] == 50051, "the server's default port"
    config = tomllib.loads(_one("ConfigMap")["data"]["petsage.toml"])
    for kind in PROBES:
        probe = container[kind]["grpc"]
        # The probe port: answered off the event loop, so a busy replica is not restarted.
        assert probe["port"] == ports["probes"] == config["server"]["probe_port"]
        assert probe["service"] in {"startup", "liveness", "readiness"}
    assert config["server"]["http_port"] == ports["http"]
    mount = container["volumeMounts"][0]["mountPath"]
    env = {item["name"]: item for item in container["env"]}
    assert env["PETSAGE_GRPC_CONFIG"]["value"] == f"{mount}/petsage.toml"


def test_termination_grace_period_covers_drain_and_grace() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    budget = float(env["PETSAGE_GRPC_DRAIN_SECONDS"]) + float(env["PETSAGE_GRPC_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > budget


@pytest.mark.slow
def test_server_started_as_in_the_manifest_answers_every_probe(
    spawn_server: Callable[..., ServerProcess],
    postgres_cluster: PostgresCluster,
    postgres_server: PostgresServer,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    (container,) = _containers()
    assert container["args"][0] == "serve"
    config = tomllib.loads(_one("ConfigMap")["data"]["petsage.toml"])
    local = {"postgres": postgres_server.url(AUTH_ROLE), "redis": redis_server.url()}
    for check in config["checks"]:
        check["target"] = local[check["kind"]]
    config_file = tmp_path / "petsage.toml"
    config_file.write_text(tomli_w.dumps(config))
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    env["PETSAGE_GRPC_CONFIG"] = str(config_file)
    # The Secret's value: the password of the PostgreSQL role that requires one.
    (secret,) = (item["name"] for item in container["env"] if "valueFrom" in item)
    env[secret] = postgres_cluster.password
    http_port, probe_port = free_port(), free_port()
    running = spawn_server(
        *container["args"][1:],
        *("--http-port", str(http_port), "--probe-port", str(probe_port)),
        env=env,
    )
    probes = f"127.0.0.1:{probe_port}"

    deadline = time.monotonic() + 20
    while _kubelet_check(running.address, "readiness") != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, running.log()
        time.sleep(0.1)
    for kind in PROBES:
        service = container[kind]["grpc"]["service"]
        status = _kubelet_check(probes, service)
        assert status == health_pb2.HealthCheckResponse.SERVING, (kind, service)
    # The httpGet alternative named in the manifest's comment answers the same.
    for path in ("/livez", "/readyz", "/startupz"):
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=5) as answer:
            assert answer.status == 200, path

    # Readiness follows the manifest's checks; liveness does not.
    redis_server.stop()
    deadline = time.monotonic() + 20
    while _kubelet_check(probes, "readiness") == health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, running.log()
        time.sleep(0.1)
    assert _kubelet_check(probes, "liveness") == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=5)
    assert refused.value.code == 503

    running.signal()
    assert running.wait(timeout=float(env["PETSAGE_GRPC_DRAIN_SECONDS"]) + 10) == 0
    assert postgres_cluster.password not in running.log()


def _mebibytes(quantity: str) -> int:
    units = {"Mi": 1, "Gi": 1024}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity.removesuffix(suffix)) * factor
    raise AssertionError(f"memory quantity not in Mi or Gi: {quantity!r}")


def test_manifest_memory_and_the_server_budget_agree() -> None:
    """The container's limit is the budget the server runs with (its caps are derived from
    it), and its request covers what a started server holds."""
    from petsage_grpc.server._budget import BASELINE_MIB  # noqa: PLC0415
    from petsage_grpc.server._settings import SERVER_SETTINGS  # noqa: PLC0415

    (container,) = _containers()
    memory = container["resources"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    config = tomllib.loads(_one("ConfigMap")["data"]["petsage.toml"])
    (setting,) = (s for s in SERVER_SETTINGS if s.name == "memory_budget")
    budget = setting.convert(
        env.get(setting.env) or config.get("server", {}).get("memory_budget") or setting.default
    )
    assert _mebibytes(memory["limits"]["memory"]) == budget
    assert _mebibytes(memory["requests"]["memory"]) >= BASELINE_MIB

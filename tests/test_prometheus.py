"""A real Prometheus scrapes a real petsage-grpc with deploy/prometheus-rules.yaml loaded.

Debian's ``prometheus`` runs as a child process on loopback, scraping the server's
``/metrics`` every second and evaluating the rules every second. The server's one
critical check dials a TCP listener the test owns. Stopping the listener must take the
alerts through pending to firing in Prometheus' own HTTP API, and stopping the server
must fire the scrape alert: proof that the metric names, labels and types are right for
Prometheus itself, not only for the client library.

The rules are loaded as written except for their ``for`` durations (minutes in
production), which are cut to a few seconds; every expression is unchanged.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
import yaml
from conftest import ROOT, ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tcp_listener import free_port
from test_http import FAST, Listener, check_table, wait_for_status

pytestmark = pytest.mark.slow

PROMETHEUS: Final = Path("/usr/bin/prometheus")
RULES: Final = ROOT / "deploy" / "prometheus-rules.yaml"
JOB: Final = "petsage-grpc"
FOR: Final = "4s"
"""Every rule's ``for`` in this test: long enough to see pending, short enough to wait for."""
WAIT: Final = 90.0
"""Deadline for an alert state (generous: Prometheus and the server share a loaded machine)."""
SpawnServer = Callable[..., ServerProcess]


@dataclass
class Prometheus:
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **query: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]

    def alerts(self) -> dict[str, str]:
        """Each active alert's name and state (pending or firing)."""
        return {a["labels"]["alertname"]: a["state"] for a in self.api("alerts")["alerts"]}

    def wait_for(self, what: str, predicate: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT
        while not predicate():
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited: {self.log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {WAIT:g}s; alerts: {self.alerts()}")
            time.sleep(0.1)

    def wait_for_alert(self, name: str, state: str) -> None:
        self.wait_for(f"{name} {state}", lambda: self.alerts().get(name) == state)


def rules_for_this_test(tmp_path: Path) -> Path:
    """The production rules with short ``for`` durations, written for this Prometheus."""
    with RULES.open(encoding="utf-8") as file:
        rules = yaml.safe_load(file)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = FOR
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    return path


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    started: list[Prometheus] = []

    def start(metrics_port: int) -> Prometheus:
        if not PROMETHEUS.exists():
            pytest.fail(f"{PROMETHEUS} is missing: scripts/test installs Debian's prometheus")
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(rules_for_this_test(tmp_path))],
            "scrape_configs": [
                {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
            ],
        }
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        port = free_port()
        log = tmp_path / "prometheus.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        running = Prometheus(port, process, log)
        started.append(running)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/-/ready", timeout=5
                ) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        return running

    yield start
    for running in started:
        running.process.terminate()
        try:
            running.process.wait(30)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait(10)


def metric_names_in_rules() -> set[str]:
    return set(re.findall(r"petsage_grpc_\w+", RULES.read_text(encoding="utf-8")))


def test_alerts_fire_in_a_real_prometheus(
    tmp_path: Path,
    spawn_server: SpawnServer,
    prometheus_for: Callable[[int], Prometheus],
) -> None:
    with Listener() as listener:
        config = tmp_path / "petsage.toml"
        config.write_text(check_table("db", listener.address, **FAST), encoding="utf-8")
        metrics_port = free_port()
        server = spawn_server(
            "--http-port", str(metrics_port), "--config", str(config), "--drain-seconds", "0"
        )
        wait_for_status(metrics_port, "/readyz", 200)
        # One RPC, so that the RPC counter has a series.
        with grpc.insecure_channel(server.address) as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        prometheus = prometheus_for(metrics_port)

        # Every metric the rules use is scraped, and every rule evaluates without error.
        def scraped_everything() -> bool:
            found = prometheus.api("query", query=f'group by (__name__) ({{job="{JOB}"}})')
            names = {series["metric"]["__name__"] for series in found["result"]}
            return metric_names_in_rules() <= names

        prometheus.wait_for("every metric the rules use", scraped_everything)
        prometheus.wait_for(
            "every rule evaluated",
            lambda: all(
                rule["health"] == "ok"
                for group in prometheus.api("rules")["groups"]
                for rule in group["rules"]
            ),
        )
        # Before its first scrape, the target's "up" is absent: that alert resolves.
        prometheus.wait_for("no alert while all is well", lambda: prometheus.alerts() == {})

        # The dependency stops: the check fails, readiness follows.
        listener.close()
        for name in ("PetSageGrpcCriticalCheckFailing", "PetSageGrpcNotReady"):
            prometheus.wait_for_alert(name, "pending")
        for name in ("PetSageGrpcCriticalCheckFailing", "PetSageGrpcNotReady"):
            prometheus.wait_for_alert(name, "firing")
        (failing,) = (
            a
            for a in prometheus.api("alerts")["alerts"]
            if a["labels"]["alertname"] == "PetSageGrpcCriticalCheckFailing"
        )
        assert failing["labels"]["check"] == "db"
        assert failing["labels"]["critical"] == "true"
        assert failing["labels"]["job"] == JOB
        assert failing["annotations"]["runbook"].startswith("docs/operations.md#")

        # Back again: the alerts resolve.
        listener.open()
        prometheus.wait_for("the alerts to resolve", lambda: prometheus.alerts() == {})

    # The server stops: the scrape fails, and that is an alert too.
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    prometheus.wait_for_alert("PetSageGrpcScrapeMissing", "pending")
    prometheus.wait_for_alert("PetSageGrpcScrapeMissing", "firing")

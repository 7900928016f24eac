"""Prometheus metrics of ``petsage-grpc serve``: statuses, dependency checks and RPC counts.

The server runs as a subprocess with a configuration file of real ``tcp`` checks (one
against a listener, one against a closed port); every scrape is a real HTTP GET.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
import pytest
from conftest import ROOT, ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tcp_listener import TcpListener, free_port, refuses_connections

# /metrics is served on the HTTP port.
METRICS_FLAG: Final = "--http-port"
STEP: Final = 60.0
"""Bound on waiting for the checks to reach a state (generous: the machine is shared)."""
RPC_TIMEOUT: Final = 5.0
LOOP_SLACK: Final = 5.0
"""How late a starved event loop may end a timed-out attempt on a busy machine."""
CHECK_METHOD: Final = "grpc.health.v1.Health/Check"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """GET /metrics and return every sample by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def rpcs(samples: Samples, method: str, code: str) -> float:
    return value(samples, "petsage_grpc_rpcs_total", method=method, code=code) or 0.0


def scrape_until(port: int, predicate: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until *predicate* holds for a scrape; fail after STEP seconds."""
    deadline = time.monotonic() + STEP
    while True:
        samples = scrape(port)
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; last scrape: {samples}")
        time.sleep(0.02)


@dataclass
class Served:
    server: ServerProcess
    metrics_port: int
    started: float


@pytest.fixture
def served(tmp_path: Path, spawn_server: Callable[..., ServerProcess]) -> Iterator[Served]:
    """A server with a passing critical check "up" and a failing non-critical check "down"."""
    with TcpListener() as listener:
        config = tmp_path / "petsage.toml"
        config.write_text(
            '[[checks]]\nname = "up"\nkind = "tcp"\n'
            f'target = "{listener.address}"\ninterval = "100ms"\ntimeout = "500ms"\n'
            '[[checks]]\nname = "down"\nkind = "tcp"\n'
            f'target = "127.0.0.1:{free_port()}"\ninterval = "100ms"\ntimeout = "500ms"\n'
            "critical = false\n",
            encoding="utf-8",
        )
        metrics_port = free_port()
        started = time.time()
        server = spawn_server("--config", str(config), METRICS_FLAG, str(metrics_port))
        yield Served(server, metrics_port, started)


@pytest.fixture
def health(served: Served) -> Iterator[health_pb2_grpc.HealthStub]:
    with grpc.insecure_channel(served.server.address) as channel:
        yield health_pb2_grpc.HealthStub(channel)


def settled(samples: Samples) -> bool:
    """Both checks have been judged: "up" passed and "down" failed twice or more."""
    failures = value(samples, "petsage_grpc_check_consecutive_failures", check="down")
    return (
        value(samples, "petsage_grpc_service_serving", service="check.up") == 1.0
        and failures is not None
        and failures >= 2
    )


def test_service_serving_per_board_name(served: Served) -> None:
    samples = scrape_until(served.metrics_port, settled, "the checks to settle")
    expected = {
        "": 1.0,
        "liveness": 1.0,
        "readiness": 1.0,
        "startup": 1.0,
        "petsage.v1.SmokeTestService": 1.0,
        "check.up": 1.0,
        "check.down": 0.0,
    }
    for service, serving in expected.items():
        assert value(samples, "petsage_grpc_service_serving", service=service) == serving, service


def test_check_gauges(served: Served) -> None:
    samples = scrape_until(served.metrics_port, settled, "the checks to settle")
    now = time.time()
    failures = value(samples, "petsage_grpc_check_consecutive_failures", check="down")
    assert failures is not None
    assert failures > 0
    assert value(samples, "petsage_grpc_check_consecutive_failures", check="up") == 0.0
    last_success = value(samples, "petsage_grpc_check_last_success_timestamp_seconds", check="up")
    assert last_success is not None
    assert served.started - 1 <= last_success <= now + 1
    # A check that never passed has no last success at all (not 0, not a guess).
    assert value(samples, "petsage_grpc_check_last_success_timestamp_seconds", check="down") is None
    for check in ("up", "down"):
        duration = value(samples, "petsage_grpc_check_last_duration_seconds", check=check)
        assert duration is not None
        # Bounded by the check's 0.5 s timeout; the rest allows for a loop starved of CPU
        # on a shared machine (a timeout that did not fire at all would show as far more).
        assert 0 <= duration < 0.5 + LOOP_SLACK, check


def test_alerting_gauges_and_status_changes(served: Served) -> None:
    samples = scrape_until(served.metrics_port, settled, "the checks to settle")
    serving = "petsage_grpc_check_serving"
    assert value(samples, serving, check="up", critical="true") == 1.0
    assert value(samples, serving, check="down", critical="false") == 0.0
    for check in ("up", "down"):
        assert value(samples, "petsage_grpc_check_timeout_seconds", check=check) == 0.5
    # "up" went SERVING once; "down" never left NOT_SERVING.
    changes = "petsage_grpc_check_status_changes_total"
    assert value(samples, changes, check="up") == 1.0
    assert value(samples, changes, check="down") == 0.0


def test_event_loop_lag_and_stalls(served: Served) -> None:
    samples = scrape(served.metrics_port)
    lag = value(samples, "petsage_grpc_event_loop_lag_seconds")
    assert lag is not None
    assert lag >= 0
    # A counter: exposed with _total, as Prometheus expects.
    assert value(samples, "petsage_grpc_event_loop_stalls_total") == 0.0


def test_rpcs_are_counted_by_method_and_code(
    served: Served, health: health_pb2_grpc.HealthStub
) -> None:
    port = served.metrics_port
    before = scrape(port)
    for _ in range(3):
        response = health.Check(
            health_pb2.HealthCheckRequest(service="readiness"), timeout=RPC_TIMEOUT
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as failure:
        health.Check(health_pb2.HealthCheckRequest(service="no-such-service"), timeout=RPC_TIMEOUT)
    assert failure.value.code() is grpc.StatusCode.NOT_FOUND

    ok, not_found = (
        rpcs(before, CHECK_METHOD, "OK") + 3,
        rpcs(before, CHECK_METHOD, "NOT_FOUND") + 1,
    )
    after = scrape_until(
        port,
        lambda s: (
            rpcs(s, CHECK_METHOD, "OK") >= ok and rpcs(s, CHECK_METHOD, "NOT_FOUND") >= not_found
        ),
        "the Check RPCs to be counted",
    )
    assert rpcs(after, CHECK_METHOD, "OK") == ok
    assert rpcs(after, CHECK_METHOD, "NOT_FOUND") == not_found


def test_unknown_methods_share_one_label(served: Served) -> None:
    port = served.metrics_port
    before = scrape(port)
    random_methods = ("/petsage.Random7f3a/Method", "/x.y.Zebra91/Gallop", "/NoService")
    with grpc.insecure_channel(served.server.address) as channel:
        for method in random_methods:
            call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
            with pytest.raises(grpc.RpcError) as failure:
                call(b"", timeout=RPC_TIMEOUT)
            assert failure.value.code() is grpc.StatusCode.UNIMPLEMENTED
    expected = rpcs(before, "unknown", "UNIMPLEMENTED") + len(random_methods)
    after = scrape_until(
        port,
        lambda s: rpcs(s, "unknown", "UNIMPLEMENTED") >= expected,
        "the unknown methods to be counted",
    )
    assert rpcs(after, "unknown", "UNIMPLEMENTED") == expected
    methods = {
        dict(labels)["method"] for name, labels in after if name == "petsage_grpc_rpcs_total"
    }
    for method in random_methods:
        assert method.lstrip("/") not in methods
    assert not any("Random" in m or "Zebra" in m or "NoService" in m for m in methods)


def test_metrics_port_in_use_is_refused_in_one_line() -> None:
    grpc_port = free_port()
    with TcpListener() as busy:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "petsage_grpc",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(grpc_port),
                METRICS_FLAG,
                str(busy.port),
            ],
            capture_output=True,
            text=True,
            timeout=20,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert str(busy.port) in line
    assert "in use" in line
    assert "serving on" not in result.stderr
    assert refuses_connections(grpc_port)

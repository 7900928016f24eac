"""One round of each outage scenario through each front end (``scripts/outage.py``).

Three examples/embed.py replicas, each with its own Redis, behind HAProxy running
deploy/haproxy.cfg unchanged, behind Envoy running deploy/envoy.yaml (its placeholders
filled in, as envsubst would), behind Traefik running deploy/traefik.yaml unchanged, and
behind a grpcio channel with the documented service configuration (round_robin,
healthCheckConfig on readiness, retries on UNAVAILABLE), at a lower rate than the
script's default. The script measures; this test runs it as a user would and judges its
JSON report:

- every scenario ran and every replica came back into rotation;
- grpc: no failed call in a rolling restart or a dependency outage (the target), and none
  in a crash either: the retry policy covers what the Watch has not yet reported;
- HAProxy: no failed call in a rolling restart; a dependency outage may fail calls, but
  only inside the detection window (none that started after HAProxy marked the replica
  DOWN); a crash, only the calls HAProxy had already sent to the dying replica. How long
  the window is, is reported, never asserted (a loaded machine stretches it).
- Envoy: no failed call in a rolling restart, and none in a dependency outage or a crash
  either: its application route retries UNAVAILABLE on another replica (the example's
  contract makes that safe), which covers the detection window HAProxy cannot. Without
  that retry (``--envoy-retries off``), failures only inside the detection window.
- Traefik: no failed call in a rolling restart; a dependency outage as HAProxy (its gRPC
  check follows ``""``, which turns with readiness).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import pytest

pytestmark = pytest.mark.slow

ROOT: Final = Path(__file__).resolve().parent.parent
OUTAGE: Final = ROOT / "scripts" / "outage.py"
RATE: Final = 100
RUN_TIMEOUT: Final = 240
"""One round of each scenario takes about 35 s per front end; the bound is generous."""


def run_outage(front_end: str, out: Path, *options: str) -> dict[str, Any]:
    finished = subprocess.run(
        [
            sys.executable, str(OUTAGE), "--front-end", front_end, "--checks", "on",
            "--rounds", "1", "--rate", str(RATE), "--json", str(out), *options,
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=ROOT,
        check=False,
    )  # fmt: skip
    assert finished.returncode == 0, f"{finished.stdout}\n{finished.stderr}"
    report: dict[str, Any] = json.loads(out.read_text())
    assert report["ok"] is True
    (run,) = report["runs"]
    assert isinstance(run, dict)
    assert (run["front_end"], run["checks"]) == (front_end, True)
    assert list(run["counts"]) == ["restart", "dependency", "crash"]
    events = run["events"]
    assert [e["scenario"] for e in events] == ["restart"] * 3 + ["dependency", "crash"]
    for event in events:
        # Every replica left the rotation and came back (the script waits for it).
        assert event["calls"] > 0, event
        assert event["back_ms"] is not None, event
        assert event["front_end_off_ms"] is not None, event
        if event["scenario"] != "crash":
            # Failures only inside the detection window (a crash's are in flight: below).
            assert event["failed_after_off"] == 0, event
    sys.stdout.write(finished.stdout)  # the timeline, for -s and for failures
    return run


def failed(run: dict[str, Any], scenario: str) -> int:
    counts: dict[str, int] = run["counts"][scenario]
    return sum(n for outcome, n in counts.items() if outcome not in {"OK", "SKIPPED"})


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_grpc_client_side_health_checking_with_retries_fails_no_call(tmp_path: Path) -> None:
    run = run_outage("grpc", tmp_path / "grpc.json")
    assert run["retries"] is True
    assert failed(run, "restart") == 0
    assert failed(run, "dependency") == 0
    # A crash: the in-flight calls of a killed replica that are not reads cannot be
    # retried safely (docs/reliability.md); reads and new connections are.
    crash = next(e for e in run["events"] if e["scenario"] == "crash")
    assert crash["failed"] < crash["calls"] / 10, crash


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_haproxy_fails_calls_only_inside_the_detection_window(tmp_path: Path) -> None:
    run = run_outage("haproxy", tmp_path / "haproxy.json")
    assert failed(run, "restart") == 0
    dependency, crash = (e for e in run["events"] if e["scenario"] != "restart")
    # A third of the event's calls go to that replica: without checks, the 3 s outage alone
    # fails most of them; with them, only those sent before HAProxy took it off.
    assert dependency["failed"] < dependency["calls"] / 3
    # A crash fails the calls HAProxy had sent on its connection to the replica when the
    # replica died (REFUSED_STREAM); new connections are refused, retried, redispatched.
    assert crash["failed"] < crash["calls"] / 10, crash


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_envoy_with_the_shipped_retries_fails_no_call(tmp_path: Path) -> None:
    run = run_outage("envoy", tmp_path / "envoy.json")
    assert (run["retries"], run["front_retries"]) == (False, True)  # Envoy's own retries
    assert failed(run, "restart") == 0
    assert failed(run, "dependency") == 0
    # A crash: the in-flight calls of a killed replica that are not reads cannot be
    # retried safely (docs/reliability.md); reads and new connections are.
    crash = next(e for e in run["events"] if e["scenario"] == "crash")
    assert crash["failed"] < crash["calls"] / 10, crash


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_envoy_without_retrying_unavailable_fails_only_inside_the_window(tmp_path: Path) -> None:
    run = run_outage("envoy", tmp_path / "envoy.json", "--envoy-retries", "off")
    assert run["front_retries"] is False
    assert failed(run, "restart") == 0
    dependency, crash = (e for e in run["events"] if e["scenario"] != "restart")
    assert 0 < dependency["failed"] < dependency["calls"] / 3, dependency
    # A crash: the connection's in-flight calls end in a reset, which the shipped
    # configuration retries only for reads; new connections are refused and retried.
    assert crash["failed"] < crash["calls"] / 10, crash


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_traefik_grpc_health_check_keeps_restarts_clean(tmp_path: Path) -> None:
    run = run_outage("traefik", tmp_path / "traefik.json")
    assert failed(run, "restart") == 0
    dependency, crash = (e for e in run["events"] if e["scenario"] != "restart")
    assert dependency["failed"] < dependency["calls"] / 3, dependency
    assert crash["failed"] < crash["calls"] / 10, crash

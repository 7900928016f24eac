"""The benchmark (benchmarks/run.py) in its smoke mode: every section runs, none fails,
and every target the published full run evaluates gets a real measurement.

Nothing here is timed and no target has to be met: the machine is shared, so the figures
themselves prove nothing; that each target was measured (a number, not a dash) proves the
benchmark still works end to end. Slow (about a minute, several peers each): left out of
``scripts/test --fast``, kept in the full gate so that the benchmark cannot rot unseen.
Needs h2load and nghttp (Debian's nghttp2-client), Node with the root node_modules
(``npm ci``), and taskset.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Any

import pytest
from conftest import ROOT

SECTIONS = (
    "throughput",
    "kubelet",
    "hanging_dependency",
    "watch",
    "startup",
    "exec_probe",
    "status_page",
    "busy_backend",
    "wedge",
)
EXEC_PROBE_COMMANDS = {"python -c pass", "probe", "probe TLS", "grpcio client"}
CHECK_PEERS = {"bare-aio", "petsage", "stock-aio", "stock-sync", "grpc-js"}
WATCH_PEERS = {"bare-stream", "petsage-embedded", "stock-aio"}
RUN_TIMEOUT = 600
"""Bound on one smoke run (about a minute on a quiet machine; generous: it is shared)."""
DASH = "\u2013"
"""What benchmarks/report.py shows for a value it could not measure."""
PUBLISHED = ROOT / "docs" / "benchmarks.json"
"""The full run the documentation shows: the smoke run must evaluate as many targets."""

pytestmark = pytest.mark.slow


def _missing_tools() -> list[str]:
    tools = ("h2load", "nghttp", "node", "taskset", "openssl")
    missing = [tool for tool in tools if not shutil.which(tool)]
    for package in ("@grpc/grpc-js", "grpc-health-check"):
        if not (ROOT / "node_modules" / package / "package.json").is_file():
            missing.append(f"node_modules/{package}")
    return missing


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    missing = _missing_tools()
    assert not missing, (
        f"the benchmark smoke test needs {', '.join(missing)}: "
        "apt-get install nghttp2-client; npm ci"
    )
    out = tmp_path_factory.mktemp("benchmark")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert (out / "benchmarks.md").is_file()
    results: dict[str, Any] = json.loads((out / "benchmarks.json").read_text())
    return results


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_every_section_ran_without_errors(smoke: dict[str, Any]) -> None:
    assert smoke["errors"] == []
    assert smoke["meta"]["mode"] == "smoke"
    for section in SECTIONS:
        assert smoke["sections"].get(section), f"section {section} is missing or empty"
    assert smoke["targets"], "no targets were evaluated"


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_every_target_got_a_real_measurement(smoke: dict[str, Any]) -> None:
    published = json.loads(PUBLISHED.read_text(encoding="utf-8"))["targets"]
    targets = smoke["targets"]
    assert len(targets) == len(published), [target["target"] for target in targets]
    unmeasured = [t["target"] for t in targets if t["met"] is None or t["measured"] == DASH]
    assert unmeasured == [], "targets without a measurement"
    for target in targets:
        assert any(character.isdigit() for character in target["measured"]), target


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_every_peer_was_measured(smoke: dict[str, Any]) -> None:
    sections = smoke["sections"]
    assert set(sections["throughput"]["summary"]) == CHECK_PEERS
    assert set(sections["kubelet"]["summary"]) == CHECK_PEERS
    for peer, row in sections["kubelet"]["summary"].items():
        assert row["probes_per_second"] > 0, peer
    assert set(sections["hanging_dependency"]["summary"]) == {
        "none",
        "python-hang",
        "http-blackhole",
    }
    for size, section in sections["watch"].items():
        assert set(section["summary"]) == WATCH_PEERS
        for peer, row in section["summary"].items():
            assert row["opened"] == int(size), (size, peer)
            assert row["delivered"] == int(size), (size, peer)
    assert set(sections["startup"]["spawn"]["summary"]) == {"stock-aio", "petsage"}
    assert set(sections["startup"]["idle"]["servers"]) >= {"stock-aio", "petsage"}
    page = sections["status_page"]
    assert set(page["pages"]["summary"]) == {"no status page open", "50 status pages open"}
    assert page["pages"]["summary"]["50 status pages open"]["polls_per_second"] > 0
    assert set(page["idle"]["servers"]) == {
        "petsage",
        "petsage-grpc --http-port",
        "petsage-grpc --http-port + a check every second",
    }
    busy = sections["busy_backend"]["summary"]
    assert set(busy) == {
        f"{kind}/{app}"
        for kind in ("petsage-main", "petsage-probe", "stock-aio")
        for app in ("generic", "stub")
    }
    for label, row in busy.items():
        assert row["probes"] > 0, label
        assert row["app_calls_per_second"] > 0, label
    for run in sections["wedge"]["runs"]:
        # The blocked loop was seen: liveness turned NOT_SERVING, then SERVING again.
        assert run["heartbeat_stalls"] >= 1, run
        assert run["not_serving_after_s"] > 0, run
        assert run["serving_again_after_s"] >= 0, run
    exec_probe = sections["exec_probe"]["summary"]
    assert set(exec_probe) == EXEC_PROBE_COMMANDS
    for command, row in exec_probe.items():
        assert row["rounds"] >= 1, command
        assert row["cpu_ms"] > 0, command
        assert row["peak_rss_mib"] > 0, command
    assert sections["exec_probe"]["tls_vs_plaintext"]["wall_ms_ratio"] > 0


@pytest.mark.timeout(RUN_TIMEOUT)
def test_the_ab_runs_every_kind_it_is_given() -> None:
    kinds = ("bare-aio", "bare-su", "petsage-registered")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.ab", *kinds, "--rounds", "1", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("round 1: bare-aio ")
    for kind in kinds:
        summary = next(line for line in lines if line.startswith(f"{kind}: "))
        ratio = float(summary.split()[1])
        assert ratio > 0, summary
    assert "bare-aio: 1.000 of bare-aio" in done.stdout

"""A 30-second soak with 300 watchers, then a drain under load (``scripts/soak.py``).

The script does the measuring and judging (see its docstring: what a lost transition
is, what the drain must do); this test runs it as a user would and checks its verdict
and its JSON report. The only timed rule is the product's own: readiness watchers see
NOT_SERVING within 100 ms of SIGTERM. Throughput figures are reported, never asserted.
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
SOAK: Final = ROOT / "scripts" / "soak.py"
SECONDS: Final = 30
WATCHERS: Final = 300
RUN_TIMEOUT: Final = 150
"""The run takes about 40 s (30 s of load, baseline, 2 s drain); the bound is generous."""
# The product's rule is 100 ms (scripts/soak.py's default, measured by the soak run in
# docs/reliability.md). On a machine the suite shares, the test asks for the order of
# events: every readiness watcher told in the first half of the 2 s drain, while the
# server still answers.
NOTICE_LIMIT_MS: Final = 1000.0


@pytest.fixture(scope="module")
def soak_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    finished = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            "--seconds",
            str(SECONDS),
            "--watchers",
            str(WATCHERS),
            "--notice-limit-ms",
            str(NOTICE_LIMIT_MS),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=ROOT,
        check=False,
    )
    assert out.exists(), f"no report written:\n{finished.stdout}\n{finished.stderr}"
    report: dict[str, Any] = json.loads(out.read_text())
    return finished, report


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_soak_passes(soak_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    finished, report = soak_run
    assert finished.returncode == 0, f"{finished.stdout}\n{finished.stderr}"
    assert report["ok"] is True
    assert report["failures"] == []
    assert report["errors"]["count"] == 0, report["errors"]
    assert report["lost_transitions"] == 0


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_soak_load_and_transitions(
    soak_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    soak = soak_run[1]["soak"]
    calls = soak["calls"]
    assert calls["Check"]["OK"] > 0
    assert calls["Check"]["NOT_FOUND"] > 0  # the unknown name, every seventh Check
    assert calls["List"]["OK"] > 0
    assert calls["SmokeTest"]["OK"] > 0
    for method, outcomes in calls.items():
        # RECYCLED: calls the client itself cut by closing a channel on purpose.
        assert set(outcomes) <= {"OK", "NOT_FOUND", "RECYCLED"}, (method, outcomes)
    watches = soak["watches"]
    assert watches["opened"] > WATCHERS  # the slots came and went
    assert watches["channels_recycled"] >= 1
    assert set(watches["left"]) <= {"stayed", "channel closed (recycled)"}
    flipper = soak["flipper"]
    assert flipper["flips"] > 0
    assert flipper["checkpoints"] >= 2  # two during the load and the final one
    assert flipper["lost_transitions"] == 0
    assert flipper["steady_watchers"] > 0
    # Exact accounting between checkpoints: what was not received was coalesced in pairs.
    assert (
        flipper["steady_transitions_received"] + 2 * flipper["steady_coalesced_pairs"]
        == flipper["steady_flips_observed"]
    )


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_soak_returns_to_baseline(
    soak_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    soak = soak_run[1]["soak"]
    assert soak["baseline_restored"] is True
    assert soak["watchers"]["baseline"] == soak["watchers"]["end"] == 0
    assert soak["watchers"]["peak"] >= WATCHERS // 2
    assert soak["tasks"]["end"] <= soak["tasks"]["baseline"] < soak["tasks"]["peak"]
    assert soak["rss_kib"]["samples"], "RSS was sampled"
    assert soak["rss_kib"]["slope_kib_per_min"] is not None


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_drain_under_load(
    soak_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    drain = soak_run[1]["drain"]
    assert drain["ok"] is True, drain["problems"]
    assert drain["exit_code"] == 0
    assert drain["streams_total"] == WATCHERS
    assert drain["streams_ended_ok"] == WATCHERS
    notice = drain["signal_to_not_serving_ms"]
    assert notice["count"] == drain["readiness_watchers"] > 0
    assert notice["max"] <= NOTICE_LIMIT_MS, notice
    phases = drain["unary_by_phase"]
    # Started before the signal or while draining: every call completed.
    for phase in ("before_signal", "during_drain"):
        for outcome in phases[phase]:
            assert outcome.endswith(" OK") or outcome == "SmokeTest UNAVAILABLE", (phase, outcome)
    # Started once the server was stopping: refused, or (grpc/grpc#41785) cancelled by
    # grpc core in the moment before the client saw GOAWAY; those are counted apart.
    after = phases.get("after_shutdown", {})
    assert any(outcome.endswith(" UNAVAILABLE") for outcome in after), after
    for outcome, count in after.items():
        assert outcome.split()[1] in {"OK", "UNAVAILABLE", "CANCELLED"}, (outcome, count)
    cancelled = sum(count for outcome, count in after.items() if outcome.endswith(" CANCELLED"))
    assert cancelled == drain["after_shutdown_cancelled"]

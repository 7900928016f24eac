"""scripts/attack.py --front envoy: attacks through the shipped deploy/envoy.yaml.

A short Watch flood and a rapid reset from 4 connections through Envoy in front of
``petsage-grpc serve``, as a user of the harness runs them: the server and Envoy stay up,
the kubelet-model probes through Envoy and on the probe port are answered afterwards, and
the report carries Envoy's memory beside the server's. The 30-second matrix and its
figures are in docs/security.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

SECONDS: Final = 3


@pytest.mark.timeout(240)
def test_attacks_through_envoy_leave_the_server_and_envoy_answering(tmp_path: Path) -> None:
    out = tmp_path / "runs.json"
    finished = subprocess.run(
        [
            sys.executable, str(ROOT / "scripts" / "attack.py"), "--front", "envoy",
            "--target", "petsage", "--transport", "plaintext", "--attack", "watch",
            "--attack", "rapid-reset", "--attack", "idle-http", "--connections", "4",
            "--seconds", str(SECONDS), "--after", "1", "--settle", "1", "--json", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=ROOT,
        check=False,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stdout + finished.stderr
    runs: list[dict[str, Any]] = json.loads(out.read_text())
    # idle-http attacks the HTTP port, which is not behind Envoy: left out.
    assert [run["attack"] for run in runs] == ["watch", "rapid-reset"]
    for run in runs:
        assert run["front"] == "envoy"
        assert run["alive"] is True
        assert run["exit_code"] == 0
        assert run["front_baseline_rss_kib"] > 0
        assert run["front_peak_rss_kib"] >= run["front_baseline_rss_kib"]
        assert run["tally"]["connections"] > 0
        # Through Envoy after the attack, and on the probe port during it.
        assert run["probes_ok_after"] >= 1, run
        assert run["probe_port_ok"] > 0, run
    table = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "attack.py"), "--table", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "| watch | 4 | plaintext | petsage via envoy |" in table
    assert "front peak MiB" in table.splitlines()[0]

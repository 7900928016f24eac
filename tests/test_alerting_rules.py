"""deploy/prometheus-rules.yaml and deploy/prometheus-rule.yaml: valid, equal, unit-tested.

``promtool`` (Debian's ``prometheus`` package) checks the rules and runs their unit
tests (tests/alerting/rules-test.yaml). That a real Prometheus scraping a real server
fires them is tests/test_prometheus.py.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any, Final

import pytest
import yaml
from conftest import ROOT

RULES: Final = ROOT / "deploy" / "prometheus-rules.yaml"
OPERATOR_RULE: Final = ROOT / "deploy" / "prometheus-rule.yaml"
RULE_TESTS: Final = ROOT / "tests" / "alerting" / "rules-test.yaml"
OPERATIONS: Final = ROOT / "docs" / "operations.md"
ALERTS: Final = {
    "PetSageGrpcNotReady",
    "PetSageGrpcCriticalCheckFailing",
    "PetSageGrpcCheckFlapping",
    "PetSageGrpcCheckSlow",
    "PetSageGrpcRpcErrors",
    "PetSageGrpcConnectionsClosed",
    "PetSageGrpcScrapeMissing",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("promtool")
    if executable is None:
        pytest.fail("promtool is missing: scripts/test installs Debian's prometheus package")
    return subprocess.run(
        [executable, *args], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )


def load(path: Any) -> dict[str, Any]:
    with path.open(encoding="utf-8") as file:
        document: dict[str, Any] = yaml.safe_load(file)
    return document


def rules() -> list[dict[str, Any]]:
    return [rule for group in load(RULES)["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rules() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout


def test_promtool_unit_tests_pass() -> None:
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    # Every alert has a unit test.
    names = {
        case["alertname"]
        for test in load(RULE_TESTS)["tests"]
        for case in test.get("alert_rule_test", [])
    }
    assert names == ALERTS


def test_every_alert_has_a_severity_summary_and_runbook() -> None:
    assert {rule["alert"] for rule in rules()} == ALERTS
    for rule in rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description", "runbook"}, rule["alert"]
        assert rule["annotations"]["runbook"] == f"docs/operations.md#{rule['alert'].lower()}"


def test_every_alert_has_its_runbook_in_the_docs() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    assert "\n## Alerts\n" in text
    alerts = text.split("\n## Alerts\n", 1)[1]
    for alert in ALERTS:
        # The heading is the anchor the rule's runbook annotation points at.
        section = alerts.split(f"\n### {alert}\n", 1)
        assert len(section) == 2, f"no runbook for {alert} in {OPERATIONS}"
        body = section[1].split("\n### ", 1)[0]
        assert "*Summary:*" in body, alert
        assert "*Runbook:*" in body, alert


def test_the_prometheus_operator_rule_holds_the_same_rules() -> None:
    operator = load(OPERATOR_RULE)
    assert operator["apiVersion"] == "monitoring.coreos.com/v1"
    assert operator["kind"] == "PrometheusRule"
    assert operator["metadata"]["name"] == "petsage-grpc"
    assert operator["spec"]["groups"] == load(RULES)["groups"]

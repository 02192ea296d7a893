"""The alert rules: valid for promtool, unit-tested with promtool's own test runner, the same
groups for compose and for Kubernetes, and covering what an on-call engineer needs."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.deploy.files import ROOT

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "k8s" / "prometheus" / "prometheusrule.yaml"
# What issue 12 asks the rules to cover, as the alerts that do.
EXPECTED = {
    "SluiceHighErrorRate",  # error rate
    "SluiceTimeToFirstTokenOverObjective",  # p99 TTFT over the objective
    "SluiceKVCacheNearlyFull",
    "SluiceQueueGrowing",
    "SluiceStoreFailures",
    "SluiceBudgetNearlySpent",
    "SluiceDown",  # engine dead (or the process gone)
}


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        message = "promtool is not installed (Debian's prometheus; scripts/test.sh installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


def alerts(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(EXPECTED)} rules found" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    """alerts.test.yml: each alert fires on its series after its `for`, and not on healthy
    ones."""
    done = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {
        t["alertname"]
        for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for t in case["alert_rule_test"]
    }
    assert tested == EXPECTED  # every alert has a test that makes it fire


def test_the_rules_cover_what_on_call_needs() -> None:
    rules = alerts(yaml.safe_load(RULES.read_text())["groups"])
    assert set(rules) == EXPECTED
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    # thresholds that follow configuration, not constants
    assert (
        'sluice_objective_seconds{objective="ttft_p99"}'
        in rules["SluiceTimeToFirstTokenOverObjective"]["expr"]
    )
    assert "sluice_budget_limit" in rules["SluiceBudgetNearlySpent"]["expr"]


def test_kubernetes_gets_the_same_rules() -> None:
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_compose_prometheus_loads_the_rules() -> None:
    prometheus = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["deploy/prometheus/alerts.yml"]  # beside the config
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["prometheus"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
    config_dir = "/etc/prometheus"
    assert mounts[f"{config_dir}/prometheus.yml"] == "./prometheus.yml"
    assert mounts[f"{config_dir}/deploy/prometheus/alerts.yml"] == "./deploy/prometheus/alerts.yml"

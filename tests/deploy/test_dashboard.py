"""The Grafana dashboard: a data source to choose, instance and model variables on every
query, the panels an on-call engineer reads, and an SLO panel that follows the configured
objective. (tests/e2e/test_prometheus.py runs every query against a real Prometheus.)"""

from __future__ import annotations

import json
import re
from typing import Any

from tests.deploy.files import ROOT

DASHBOARD = json.loads((ROOT / "grafana" / "dashboards" / "sluice.json").read_text())
PANELS: list[dict[str, Any]] = DASHBOARD["panels"]


def queries() -> list[str]:
    return [target["expr"] for panel in PANELS for target in panel["targets"]]


def test_the_data_source_is_a_variable_everywhere() -> None:
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in PANELS:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_query_follows_the_instance_and_model_variables() -> None:
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    for name in ("instance", "model"):
        assert variables[name]["includeAll"] and variables[name]["multi"]
        assert variables[name]["allValue"] == ".*"
    for expr in queries():
        for selector in re.findall(r"\b(?:sluice_\w+|vllm:\w+|up)\{([^}]*)\}", expr):
            assert 'instance=~"$instance"' in selector, expr
        assert not re.search(r"\b(?:sluice_\w+|vllm:\w+)(?=[\[\s)])", expr), f"unfiltered: {expr}"


def test_the_panels_on_call_reads() -> None:
    exprs = " ".join(queries())
    for metric in (
        "sluice_queue_time_seconds_bucket",
        "sluice_store_failures_total",
        "sluice_admission_load",
        "vllm:num_preemptions_total",
        "vllm:prefix_cache_hits_total",
        "sluice_budget_remaining",
        "sluice_engine_kv_cache_usage",
        "sluice_time_to_first_token_seconds_bucket",
    ):
        assert metric in exprs, metric


def test_the_slo_panel_follows_the_configured_objective() -> None:
    (slo,) = [p for p in PANELS if p["title"].startswith("SLO")]
    text = " ".join(t["expr"] for t in slo["targets"])
    assert "le=" not in text  # no objective written into the query
    assert 'sluice_slo_requests_total{outcome="met"' in text
    assert 'sluice_objective_seconds{objective="latency_p95"' in text

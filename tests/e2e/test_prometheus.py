"""A real Prometheus scrapes a real `sluice serve`; every dashboard query must return data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from sluice.bench.compare import free_port, wait_until_ok
from tests.e2e.conftest import MODEL
from tests.e2e.server import SluiceProcess

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "dashboards" / "sluice.json"


def _missing(binary: str) -> None:
    message = f"{binary} is not installed (scripts/test.sh installs it when run as root)"
    if os.environ.get("CI"):
        pytest.fail(message)  # CI must run these, never skip them
    pytest.skip(message)


RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
# Grafana's value for "All" (the variables' allValue).
VARIABLES = {"$instance": ".*", "$model": ".*"}
# Panels whose data needs a condition this server does not have; tested where it has it.
CONDITIONAL = {"Budget left by key": "keys with budgets (tests/api/test_gateway.py)"}


def dashboard_queries() -> list[tuple[str, str]]:
    """Every panel's query as Grafana sends it with every variable on "All"."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = []
    for panel in panels:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


def test_promtool_accepts_the_shipped_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        _missing("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(ROOT / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def prometheus(server: SluiceProcess, tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        _missing("prometheus")
    # The shipped config, pointed at the test server and scraping every second.
    config = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"  # the alert rules, evaluated in the test
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [server.url.removeprefix("http://")]}]
    config["rule_files"] = [str(RULES)]  # the config is written elsewhere: an absolute path
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until_ok(f"{url}/-/ready", 60, process), "prometheus did not become ready"
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_every_dashboard_query_returns_data(
    prometheus: str, client: openai.OpenAI, server: SluiceProcess
) -> None:
    with pytest.raises(openai.NotFoundError):  # a refusal, for the refusals panel
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    for i in range(4):
        messages = [{"role": "user", "content": f"Say hello {i}."}]
        if i % 2:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
        else:
            stream = client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=8, stream=True
            )
            assert list(stream)
        time.sleep(0.7)
    time.sleep(3)  # at least two scrapes after the last request
    empty = [
        (title, expr)
        for title, expr in dashboard_queries()
        if title not in CONDITIONAL and not _query(prometheus, expr)
    ]
    assert empty == []
    # The alert rules load and evaluate against the real series, and none fires on a
    # healthy server.
    deadline = time.monotonic() + 30
    while True:  # a rule's health is "unknown" until its first evaluation
        rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        loaded = [rule for group in rules for rule in group["rules"]]
        if all(rule["health"] != "unknown" for rule in loaded) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(loaded) == 7 and all(rule["health"] == "ok" for rule in loaded), loaded
    assert all(rule["state"] == "inactive" for rule in loaded), loaded
    # The scrape also carries vLLM's own metrics.
    assert _query(prometheus, "vllm:num_requests_running")

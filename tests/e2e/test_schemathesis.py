"""Schemathesis against sluice's own OpenAPI document: requests generated from every
operation's schema (valid and invalid), sent to a real `sluice serve` process on the
synthetic engine (vLLM's real front end and serving layer over the fake core). No response
may be a 5xx, and every error must be in OpenAI's shape. Bounded: a fixed number of
examples per operation, for bodies that fit the schema and bodies that do not, derandomised
so a run is repeatable."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.generation.case import Case

from tests.e2e.server import SluiceProcess

EXAMPLES_PER_OPERATION = 40  # per operation and mode (valid, invalid): about 20 s


@pytest.fixture(scope="module")
def synthetic_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SluiceProcess]:
    home = tmp_path_factory.mktemp("schemathesis")
    process = SluiceProcess(
        home / "sluice.log",
        "--engine",
        "synthetic",
        "--synthetic-tokens-per-s",
        "5000",
        "--max-tokens-cap",
        "64",
        "--max-model-len",
        "512",
        "--database",
        str(home / "sluice.db"),
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def api_schema(synthetic_server: SluiceProcess) -> schemathesis.BaseSchema:
    loaded = schemathesis.openapi.from_url(f"{synthetic_server.url}/openapi.json")
    return loaded.exclude(path_regex="^/(metrics|admin/.*)$")


def test_no_request_is_a_server_error(
    api_schema: schemathesis.BaseSchema, synthetic_server: SluiceProcess
) -> None:
    checked: list[str] = []
    calls: list[int] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    for operation, mode in itertools.product(operations, list(GenerationMode)):
        checked.append(operation.label)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
            # no shrinking: a failure is reported as found (shrinking a negative-mode case
            # can reach a schema schemathesis cannot negate, which then hides the failure)
            phases=[Phase.explicit, Phase.generate],
        )
        def check(case: Case) -> None:
            response = case.call(base_url=synthetic_server.url, timeout=60)
            calls.append(response.status_code)
            assert response.status_code < 500, (
                f"{case.method} {case.path} -> {response.status_code}\n"
                f"body sent: {json.dumps(case.body, default=str)[:2000]}\n"
                f"{response.text[:2000]}\n"
                + Path(synthetic_server.log_path).read_text(errors="replace")[-4000:]
            )
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}, response.text
                assert isinstance(error["message"], str) and error["message"]

        try:
            check()
        except Unsatisfiable:
            # no input to get wrong (GET /health): there is no invalid request to send
            assert mode is GenerationMode.NEGATIVE, operation.label
    assert "POST /v1/chat/completions" in checked
    assert "POST /v1/completions" in checked
    assert len(calls) >= len(checked) * 5  # every operation was exercised
    assert 200 in calls and any(400 <= status < 500 for status in calls)

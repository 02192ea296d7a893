"""End-to-end tier: real `sluice serve` processes on the real vLLM engine and default model.

One shared server for most tests (start-up costs 30-50 s); tests that end a server (drain,
engine failure) start their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from sluice.config import DEFAULT_MODEL_NAME
from tests.e2e.server import SluiceProcess

MODEL = DEFAULT_MODEL_NAME
# Small on purpose: a few long requests fill the batch, so queued (waiting) requests exist.
SHARED_ARGS = (
    "--max-num-seqs",
    "4",
    "--max-model-len",
    "2048",
    "--max-tokens-cap",
    "1024",
    "--max-n",
    "4",
    "--max-body-bytes",
    "65536",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SluiceProcess]:
    process = SluiceProcess(tmp_path_factory.mktemp("shared") / "sluice.log", *SHARED_ARGS)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture
def client(server: SluiceProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def aclient(server: SluiceProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def own_server_log(tmp_path: Path) -> Path:
    return tmp_path / "sluice.log"

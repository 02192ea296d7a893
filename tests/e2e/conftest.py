"""End-to-end tier: real `sluice serve` processes on the real vLLM engine and default model.

One shared server for most tests (start-up costs 30-50 s); tests that end a server (drain,
engine failure) start their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from sluice.config import DEFAULT_MODEL_NAME, Settings
from sluice.engine.models import default_model_dir
from tests.e2e.artifacts import lora_adapter
from tests.e2e.server import SluiceProcess

MODEL = DEFAULT_MODEL_NAME
ALIAS = "smol"
LORA = "tiny"
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
    # vLLM's own options, straight through: an alias, reasoning, a LoRA adapter.
    "--served-model-name",
    MODEL,
    ALIAS,
    "--reasoning-parser",
    "qwen3",
    # the structured-output regex of the reasoning tests also applies inside <think>
    "--structured-outputs-config",
    '{"enable_in_reasoning": true}',
    "--default-chat-template-kwargs",
    '{"enable_thinking": false}',
    "--enable-lora",
    "--max-lora-rank",
    "8",
    "--max-loras",
    "2",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def lora_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LoRA adapter for the default model (made with peft)."""
    folder = default_model_dir(Settings().cache_dir)
    return lora_adapter(folder, tmp_path_factory.mktemp("lora") / LORA)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, lora_path: Path) -> Iterator[SluiceProcess]:
    process = SluiceProcess(
        tmp_path_factory.mktemp("shared") / "sluice.log",
        *SHARED_ARGS,
        "--lora-modules",
        f"{LORA}={lora_path}",
    )
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

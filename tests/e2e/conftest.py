"""End-to-end tier: real `sluice serve` processes on the real vLLM engine and default model.

One shared server for most tests (start-up costs about a minute here); tests that end a
server (drain, engine failure) start their own. The slow servers start early, while the
faster tiers run (tests/e2e/prestart.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e import prestart
from tests.e2e.prestart import ALIAS, LORA, MODEL, SHARED_ARGS
from tests.e2e.server import SluiceProcess

__all__ = ["ALIAS", "LORA", "MODEL", "SHARED_ARGS"]  # the tests import them from here


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SluiceProcess]:
    process = prestart.take("server", tmp_path_factory)  # SHARED_ARGS, the LoRA adapter
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

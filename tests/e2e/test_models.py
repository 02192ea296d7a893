"""Models as `vllm serve` takes them: a hub id positionally, resolved from a Hugging Face hub
cache (laid out from the default model; no hub is reachable here), served under the id
exactly as given; and the one-sentence refusals for hub ids that cannot be had."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.e2e import prestart
from tests.e2e.artifacts import HUB_ID
from tests.e2e.server import SluiceProcess


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return prestart.hf_home(prestart.Context.now(tmp_path_factory))


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SluiceProcess]:
    process = prestart.take("hub_server", tmp_path_factory)  # HUB_ID from hf_home's cache
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def test_a_hub_id_is_served_from_the_cache_under_its_id(hub_server: SluiceProcess) -> None:
    client = openai.OpenAI(base_url=hub_server.api, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [HUB_ID]
    answer = client.chat.completions.create(
        model=HUB_ID,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=20,
    )
    assert answer.choices[0].message.content == "The capital of France is Paris."
    assert answer.model == HUB_ID
    assert "LocalEntryNotFound" not in hub_server.log()


def sluice_serve(*args: str, env: dict[str, str]) -> tuple[int, str, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "sluice", "serve", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    return result.returncode, result.stderr, time.monotonic() - started


def _env(home: Path, **extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SLUICE_"))}
    return {**env, "HF_HOME": str(home), **extra}


# Starts that must fail: case → (arguments, extra environment). Each is a whole `sluice
# serve` process that imports vLLM (about 20 s of one core here) before it fails, so the
# module runs them two at a time (the machine's two cores), once.
REFUSED_STARTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "not-cached": (["someone/not-cached"], {"HF_HUB_OFFLINE": "1"}),
    # a hub that refuses connections: fails fast, not after minutes of retries
    "hub-down": (["someone/not-cached"], {"HF_ENDPOINT": "http://127.0.0.1:9"}),
    "not-an-id": (["not/a/valid/id"], {"HF_HUB_OFFLINE": "1"}),
    "no-revision": ([HUB_ID, "--revision", "f" * 40], {"HF_HUB_OFFLINE": "1"}),
    "no-folder": (["./no-such-folder"], {}),
    "bad-option": ([HUB_ID, "--max-model-len", "lots"], {"HF_HUB_OFFLINE": "1"}),
    "server-option": ([HUB_ID, "--api-key", "x"], {"HF_HUB_OFFLINE": "1"}),
}


@pytest.fixture(scope="module")
def refused_starts(hf_home: tuple[Path, str]) -> dict[str, tuple[int, str, float]]:
    """`REFUSED_STARTS` run: case → (exit status, stderr, seconds)."""
    home, _ = hf_home

    def run(case: str) -> tuple[int, str, float]:
        args, extra = REFUSED_STARTS[case]
        return sluice_serve(*args, env=_env(home, **extra))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(REFUSED_STARTS, pool.map(run, REFUSED_STARTS), strict=True))


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("not-cached", "is not in the Hugging Face cache"),
        ("hub-down", "could not be reached"),
        ("not-an-id", "is neither an existing folder"),
        ("no-revision", "is not in the Hugging"),
        ("no-folder", "does not exist"),
    ],
)
def test_models_that_cannot_be_had_are_one_sentence(
    refused_starts: dict[str, tuple[int, str, float]], case: str, words: str
) -> None:
    status, stderr, seconds = refused_starts[case]
    assert status == 1, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("sluice: ")]
    assert len(lines) == 1, stderr
    assert words in lines[0]
    assert "Traceback" not in stderr
    assert seconds < 60


def test_vllm_options_are_validated_by_vllm(
    refused_starts: dict[str, tuple[int, str, float]],
) -> None:
    status, stderr, _ = refused_starts["bad-option"]
    assert status == 2
    assert "max-model-len" in stderr
    status, stderr, _ = refused_starts["server-option"]
    assert status == 2
    assert "sluice keys" in stderr

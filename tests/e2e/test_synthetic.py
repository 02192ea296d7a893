"""`sluice serve --engine synthetic`: the load-testing engine as a real process."""

from __future__ import annotations

from pathlib import Path

import openai

from tests.e2e.server import SluiceProcess


def test_synthetic_server_streams_and_says_what_it_is(own_server_log: Path) -> None:
    server = SluiceProcess(
        own_server_log, "--engine", "synthetic", "--synthetic-tokens-per-s", "500"
    )
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="synthetic",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 10
        assert "SYNTHETIC engine" in server.log()
        server.terminate()
        assert server.wait_exit() == 0
    finally:
        server.stop()

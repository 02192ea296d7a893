"""The client libraries built on the `openai` SDK, unchanged, against the shared real server:
LangChain, instructor, pydantic-ai, LiteLLM as a client, llama-index and the `llm` CLI,
each in its own virtualenv (tests/clients/venvs.py, made by scripts/test.sh from
tests/clients/requirements/: their pins conflict with each other and must not move the
server's), driven by tests/clients/drive.py the way its documentation says to use an
OpenAI-compatible server."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.clients import venvs
from tests.e2e.conftest import MODEL
from tests.e2e.server import SluiceProcess

DRIVER = Path(__file__).resolve().parents[1] / "clients" / "drive.py"


@pytest.mark.parametrize("library", venvs.libraries())
def test_a_client_library_works_unchanged(server: SluiceProcess, library: str) -> None:
    python = venvs.python_of(library)
    if python is None:
        message = f"{library}'s virtualenv is missing (scripts/test.sh makes it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)  # CI must run the client tests, never skip them
        pytest.skip(message)
    done = subprocess.run(
        [str(python), str(DRIVER), "--base", server.api, "--model", MODEL, "--library", library],
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert results, done.stderr[-3000:]
    failed = [result for result in results if not result["ok"]]
    assert not failed, "\n\n".join(f"{r['case']}:\n{r['detail']}" for r in failed)
    assert done.returncode == 0, done.stderr[-3000:]

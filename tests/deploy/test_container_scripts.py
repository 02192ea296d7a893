"""The two scripts the images run: the health probe and the entrypoint."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from tests.deploy.files import ROOT

PROBE = ROOT / "deploy" / "docker" / "probe.py"
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"


class _Handler(http.server.BaseHTTPRequestHandler):
    statuses: ClassVar[dict[str, int]] = {"/healthz": 200, "/readyz": 503}

    def do_GET(self) -> None:
        self.send_response(self.statuses.get(self.path, 404))
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def run_probe(path: str, port: int) -> int:
    env = {**os.environ, "SLUICE_PORT": str(port)}
    return subprocess.run(
        [sys.executable, str(PROBE), path], env=env, check=False, timeout=10
    ).returncode


def test_probe_passes_only_on_200(server_port: int) -> None:
    assert run_probe("/healthz", server_port) == 0
    assert run_probe("/readyz", server_port) == 1  # 503
    assert run_probe("/nope", server_port) == 1


def test_probe_fails_when_nothing_listens(server_port: int) -> None:
    assert run_probe("/healthz", 1) == 1


def test_entrypoint_is_posix_sh_and_executable() -> None:
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    assert os.access(ENTRYPOINT, os.X_OK)
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True)


def test_entrypoint_runs_the_command_as_the_current_unprivileged_user(tmp_path: Path) -> None:
    command = ["sh", str(ENTRYPOINT), "sh", "-c", 'echo "$(id -u) $0"', "ran"]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv is not installed")
        command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    env = {**os.environ, "SLUICE_CACHE_DIR": str(tmp_path)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    uid = 65534 if os.geteuid() == 0 else os.geteuid()
    assert result.stdout.split() == [str(uid), "ran"]

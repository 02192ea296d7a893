"""Deploy tier: the deployment files checked against each other and against the server, with no
Docker daemon, cluster or cloud account."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _no_sluice_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings read SLUICE_* variables: only what a test sets may count. Whatever a test
    builds (the embedded store's database) goes to a fresh folder."""
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path / "cache"))

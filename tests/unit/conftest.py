"""Unit tier: pure logic, no app, no engine processes."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _no_sluice_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read SLUICE_* variables; the developer's shell must not change these tests."""
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)

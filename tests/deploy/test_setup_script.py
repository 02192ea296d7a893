"""scripts/setup.sh: what a newcomer's machine lacks gets one sentence with the fix, before
anything is installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.deploy.files import ROOT

SETUP = ROOT / "scripts" / "setup.sh"


def run_setup(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SETUP)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SLUICE_VENV": str(tmp_path / "venv"), **env},
    )


def fake_python(tmp_path: Path, body: str) -> str:
    """A `python3` that runs `body` (a shell script) instead."""
    path = tmp_path / "python3"
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_an_old_python_is_named_with_the_fix(tmp_path: Path) -> None:
    python = fake_python(
        tmp_path,
        'case "$*" in *version_info*\\<*) exit 1;; --version) echo "Python 3.10.12";; esac',
    )
    done = run_setup(tmp_path, PYTHON=python)
    assert done.returncode == 1
    assert "needs Python 3.11 or newer and" in done.stderr and "3.10.12" in done.stderr
    assert not (tmp_path / "venv").exists()


def test_a_missing_venv_module_is_named_with_the_fix(tmp_path: Path) -> None:
    python = fake_python(
        tmp_path,
        f'case "$*" in *ensurepip*) exit 1;; *) exec {sys.executable} "$@";; esac',
    )
    done = run_setup(tmp_path, PYTHON=python)
    assert done.returncode == 1
    assert "sudo apt install python3-venv" in done.stderr
    assert not (tmp_path / "venv").exists()


def test_the_gpu_stack_never_reuses_a_cpu_environment(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / ".sluice-target").write_text("cpu\n")
    done = run_setup(tmp_path, SLUICE_TARGET="gpu")
    assert done.returncode == 1
    assert "holds the cpu stack" in done.stderr and ".venv-gpu" in done.stderr
    assert sorted(p.name for p in venv.iterdir()) == [".sluice-target", "bin"]  # untouched


def test_the_gpu_stack_has_its_own_default_environment() -> None:
    text = SETUP.read_text()
    assert "venv=${SLUICE_VENV:-.venv-gpu}" in text
    assert "venv=${SLUICE_VENV:-.venv-gpu}" in (ROOT / "scripts" / "serve.sh").read_text()

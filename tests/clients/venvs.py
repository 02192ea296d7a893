"""The client libraries' virtualenvs, one per file in requirements/ (their pins conflict:
llama-index's OpenAI client wants `openai<3`, `llm` wants `openai>3`), kept out of the
repository under the user's cache (`~/.cache/sluice/clients/<library>-<hash>`, the hash of
the requirements and the Python version), so a fresh clone reuses them.

    .venv/bin/python -m tests.clients.venvs     # make the missing ones (scripts/test.sh)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "requirements"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sluice" / "clients"
COMPLETE = ".complete"  # written last: a half-made virtualenv is made again


def libraries() -> list[str]:
    return sorted(path.stem for path in REQUIREMENTS.glob("*.txt"))


def venv_of(library: str) -> Path:
    """Where `library`'s virtualenv lives (made or not)."""
    content = (REQUIREMENTS / f"{library}.txt").read_bytes()
    version = f"{sys.version_info.major}.{sys.version_info.minor}".encode()
    digest = hashlib.sha256(content + b"\0" + version).hexdigest()[:12]
    return CACHE / f"{library}-{digest}"


def python_of(library: str) -> Path | None:
    """The virtualenv's Python if it is complete, else None."""
    venv = venv_of(library)
    return venv / "bin" / "python" if (venv / COMPLETE).exists() else None


def ensure(library: str) -> Path:
    """Make `library`'s virtualenv unless it is there; its Python."""
    found = python_of(library)
    if found is not None:
        return found
    venv = venv_of(library)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    install = [*pip, "install", "-r", str(REQUIREMENTS / f"{library}.txt")]
    done = subprocess.run(install, capture_output=True, text=True)  # pip's notes: on failure
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"installing {library}'s client libraries failed")
    (venv / COMPLETE).touch()
    return venv / "bin" / "python"


if __name__ == "__main__":
    for name in libraries():
        print(f"{name}: {ensure(name)}", flush=True)

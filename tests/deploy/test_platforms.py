"""fly.toml and deploy/render.yaml: parsed, and shaped the way each platform needs."""

from __future__ import annotations

import yaml

from tests.deploy.files import (
    IMAGE_KEYS_FILE,
    RENDER,
    ROOT,
    dockerfile_stages,
    fly,
    image_env,
    render_env,
    render_service,
    seconds,
)

FLY_MAX_KILL_TIMEOUT_S = 300  # Fly's documented ceiling


def image_key_variables() -> set[str]:
    return {k["secret_env"] for k in yaml.safe_load(IMAGE_KEYS_FILE.read_text())["keys"]}


def test_fly_builds_a_dockerfile_target() -> None:
    config = fly()
    assert (ROOT / config["build"]["dockerfile"]).is_file()
    assert config["build"]["build-target"] in {s.name for s in dockerfile_stages()}


def test_fly_one_region_one_machine_no_autoscaling() -> None:
    config = fly()
    assert len(config["primary_region"]) == 3
    service = config["http_service"]
    assert service["auto_stop_machines"] == "off"
    assert service["auto_start_machines"] is False
    assert service["min_machines_running"] == 1
    assert service["concurrency"]["type"] == "requests"
    assert service["concurrency"]["soft_limit"] <= service["concurrency"]["hard_limit"]


def test_fly_checks_liveness_and_readiness() -> None:
    config = fly()
    (routing,) = config["http_service"]["checks"]
    assert routing["path"] == "/readyz" and routing["method"] == "GET"
    (alive,) = config["checks"].values()
    assert alive["type"] == "http" and alive["path"] == "/healthz"
    for check in (routing, alive):
        assert seconds(check["timeout"]) < seconds(check["interval"])


def test_fly_volume_holds_the_cache() -> None:
    config = fly()
    mount = config["mounts"]
    assert mount["destination"] == image_env(config["build"]["build-target"])["SLUICE_CACHE_DIR"]
    # Fly volume names take lowercase letters, digits and underscores only.
    assert mount["source"].replace("_", "").isalnum() and mount["source"].islower()
    assert f"fly volumes create {mount['source']}" in (ROOT / "fly.toml").read_text()


def test_fly_stops_with_sigterm_within_its_limit() -> None:
    config = fly()
    assert config["kill_signal"] == "SIGTERM"
    assert config["kill_timeout"] <= FLY_MAX_KILL_TIMEOUT_S


def test_fly_keys_come_from_a_secret() -> None:
    config = fly()
    assert config["env"]["SLUICE_GATEWAY__KEYS_FILE"] == "/etc/sluice/keys.yaml"
    for variable in image_key_variables():
        assert variable not in config["env"], "secrets belong in `fly secrets`, not [env]"
        assert f"fly secrets set {variable}=" in (ROOT / "fly.toml").read_text()


def test_fly_metrics_are_sluice_metrics_endpoint() -> None:
    config = fly()
    assert config["metrics"]["path"] == "/metrics"
    assert config["metrics"]["port"] == config["http_service"]["internal_port"]


def test_render_blueprint_shape() -> None:
    service = render_service()
    assert service["type"] == "web" and service["runtime"] == "docker"
    assert (ROOT / service["dockerfilePath"]).is_file()
    assert (ROOT / service["dockerContext"] / "Dockerfile").is_file()
    assert service["numInstances"] == 1 and "scaling" not in service
    assert service["region"] and service["plan"]
    assert service["healthCheckPath"] == "/readyz"


def test_render_builds_the_cpu_image() -> None:
    # Render has no build-target setting: it builds the Dockerfile's last stage.
    assert dockerfile_stages()[-1].name == "cpu"


def test_render_disk_holds_the_cache() -> None:
    disk = render_service()["disk"]
    assert disk["mountPath"] == image_env("cpu")["SLUICE_CACHE_DIR"]
    assert disk["sizeGB"] >= 1 and disk["name"]


def test_render_keys_are_generated_secrets() -> None:
    env = render_service()["envVars"]
    generated = {e["key"] for e in env if e.get("generateValue") is True}
    assert image_key_variables() <= generated
    assert render_env()["SLUICE_GATEWAY__KEYS_FILE"] == "/etc/sluice/keys.yaml"


def test_render_yaml_is_plain_yaml() -> None:
    loaded = yaml.safe_load(RENDER.read_text())
    assert list(loaded) == ["services"]
    for entry in render_service()["envVars"]:
        assert set(entry) in ({"key", "value"}, {"key", "generateValue"}), entry
        if "value" in entry:
            assert isinstance(entry["value"], str), f"{entry['key']}: quote the value"

"""docker-compose.yml: valid against the Compose Specification's JSON schema, and wired up.

The schema is compose-spec's own (`compose-spec.json` beside this file, Apache-2.0, vendored
from check-jsonschema 0.39.0's copy; licence in COMPOSE-SPEC-LICENSE): the file `docker
compose` itself validates against, so no Docker daemon or compose plugin is needed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from tests.deploy.files import ROOT, compose, image_env

SCHEMA = Path(__file__).with_name("compose-spec.json")
SERVERS = ("sluice", "sluice-gpu")


def schema_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(document)]


def service(name: str) -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"][name]
    return found


def test_valid_against_the_compose_spec() -> None:
    assert schema_errors(compose()) == []


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        ("sluice", "stop_grace_periods", "45s"),  # a misspelt key
        ("redis", "healthcheck", {"test": ["CMD", "redis-cli", "ping"], "intervall": "5s"}),
        ("sluice", "depends_on", {"redis": {"condition": "service_ready"}}),
    ],
)
def test_the_schema_check_catches_mistakes(where: str, key: str, value: object) -> None:
    broken = copy.deepcopy(compose())
    broken["services"][where][key] = value
    assert schema_errors(broken)


def test_cpu_by_default_gpu_in_its_profile() -> None:
    """One profile each, both on port 8000, never both: .env selects `cpu` unless
    COMPOSE_PROFILES says `gpu`."""
    cpu, gpu = service("sluice"), service("sluice-gpu")
    assert cpu["profiles"] == ["cpu"] and cpu["build"]["target"] == "cpu"
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "gpu"
    dotenv = dict(
        line.split("=", 1)
        for line in (ROOT / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert dotenv["COMPOSE_PROFILES"] == "cpu"
    for name, svc in compose()["services"].items():
        if name not in SERVERS:
            assert "profiles" not in svc, name  # the rest of the stack runs with either
    # The GPU server serves a model of the user's choosing, gated ones too, and keeps the
    # hub's downloads in a volume of their own.
    environment = gpu["environment"]
    assert environment["SLUICE_MODEL"] == "${SLUICE_MODEL:-}"
    assert environment["HF_TOKEN"] == "${HF_TOKEN:-}"
    assert f"hf-cache:{environment['HF_HOME']}" in gpu["volumes"]
    assert environment["SLUICE_GATEWAY__STORE"] == "redis"  # the shared settings still apply
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device["count"] >= 1
    # Either server is `sluice` to Prometheus.
    assert "sluice" in gpu["networks"]["default"]["aliases"]


def test_servers_run_read_only_as_the_image_user_with_their_cache_volume() -> None:
    cache = image_env("cpu")["SLUICE_CACHE_DIR"]
    volumes = compose()["volumes"]
    for name in SERVERS:
        server = service(name)
        assert server["read_only"] is True
        assert server["user"] == "10001:10001"
        assert "/tmp" in server["tmpfs"]
        mounts = dict(reversed(m.split(":")) for m in server["volumes"])
        assert mounts[cache] in volumes
        assert server["stop_signal"] == "SIGTERM"


def test_open_server_is_published_on_loopback_only() -> None:
    for name in SERVERS:
        server = service(name)
        if server["environment"].get("SLUICE_GATEWAY__INSECURE_NO_AUTH") == "true":
            for port in server["ports"]:
                assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_published_ports() -> None:
    published = {
        name: [int(p.split(":")[-2]) for p in svc.get("ports", [])]
        for name, svc in compose()["services"].items()
    }
    assert published["sluice"] == [8000]
    assert published["grafana"] == [3000]
    assert published["jaeger"] == [16686]


def test_health_checks_and_start_order() -> None:
    services = compose()["services"]
    for svc in services.values():
        for dependency, rule in svc.get("depends_on", {}).items():
            assert dependency in services
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no check"
    for name in (*SERVERS, "redis", "prometheus", "grafana"):
        assert "healthcheck" in services[name], name
    for name in SERVERS:
        assert service(name)["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service("grafana")["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_redis_persists_with_aof() -> None:
    redis = service("redis")
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(
        m.endswith(":/data") and m.split(":")[0] in compose()["volumes"] for m in redis["volumes"]
    )
    for name in SERVERS:
        env = service(name)["environment"]
        url = urlsplit(env["SLUICE_GATEWAY__REDIS_URL"])
        assert env["SLUICE_GATEWAY__STORE"] == "redis"
        assert url.hostname == "redis" and url.port == 6379


def test_every_volume_is_named_or_a_repository_path() -> None:
    named = compose()["volumes"]
    for name, svc in compose()["services"].items():
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in named, f"{name} mounts undeclared volume {source}"


def test_prometheus_uses_the_top_level_config_and_scrapes_the_server() -> None:
    prometheus = service("prometheus")
    mounts = {m.split(":")[1]: m.split(":")[0] for m in prometheus["volumes"]}
    config_path = next(a.split("=", 1)[1] for a in prometheus["command"] if "--config.file" in a)
    assert mounts[config_path] == "./prometheus.yml"
    config = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "sluice" and int(port) == 8000


def test_grafana_provisioning_and_datasource_fit_the_stack() -> None:
    grafana = service("grafana")
    mounts = {m.split(":")[1]: m.split(":")[0] for m in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    provider = yaml.safe_load(
        (ROOT / "grafana" / "provisioning" / "dashboards" / "sluice.yml").read_text()
    )["providers"][0]
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    datasource = yaml.safe_load(
        (ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    url = urlsplit(datasource["url"])
    assert url.hostname == "prometheus" and url.port == 9090
    assert "127.0.0.1:9090:9090" in service("prometheus")["ports"]


def test_traces_go_to_jaeger_over_otlp_http() -> None:
    jaeger = service("jaeger")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    for name in SERVERS:
        endpoint = urlsplit(service(name)["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint.hostname == "jaeger" and endpoint.port == 4318


def test_third_party_images_are_pinned() -> None:
    for name, svc in compose()["services"].items():
        image = svc["image"]
        _, _, tag = image.rpartition(":")
        assert tag and tag != "latest" and any(ch.isdigit() for ch in tag), f"{name}: {image}"

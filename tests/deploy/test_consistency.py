"""Every deployment agrees with the server: health paths, ports, metric names, SLUICE_*
variables, start-up budgets, drain against grace periods, and request time limits.

The server side is read from the code, never restated: routes from the app built with the
API tier's fake engine, settings from the pydantic model, metric names from the app's own
registry, the drain's cut-off from `sluice.server`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from sluice.app import create_app
from sluice.config import LimitSettings, Settings
from sluice.engine.protocol import EngineStats
from sluice.gateway.command import open_bind_refusal
from sluice.lifecycle import CUT_OFF_GRACE_S
from sluice.server import CUT_OFF_S
from sluice.telemetry.metrics import Metrics
from tests.deploy.files import (
    DEPLOY_DOC,
    DEPLOY_FILES,
    ENV_NAME,
    IMAGE_KEYS_FILE,
    METRIC_DOCUMENTS,
    METRIC_NAME,
    README,
    ROOT,
    compose,
    configmap_entry,
    dockerfile_stages,
    fly,
    healthcheck_option,
    healthcheck_path,
    image_env,
    k8s_object,
    pod_spec,
    render_env,
    render_service,
    seconds,
    settings_path,
    sluice_container,
    stage_chain,
)
from tests.fake_engine import FakeEngine

# After the drain: the cut-off's answers, uvicorn's cut-off, vLLM's engine shutdown (it kills
# its engine core after 5 s), the interpreter's exit (2.5 s measured) and the last span export
# (3 s). The platform's grace period must leave this much beyond drain_timeout_s.
VLLM_ENGINE_SHUTDOWN_S = 5.0
EXIT_AND_EXPORT_S = 6.0
SHUTDOWN_MARGIN_S = CUT_OFF_GRACE_S + CUT_OFF_S + VLLM_ENGINE_SHUTDOWN_S + EXIT_AND_EXPORT_S
# Render's shutdown delay when render.yaml does not set maxShutdownDelaySeconds.
RENDER_DEFAULT_SHUTDOWN_S = 30.0
# Start-up budgets allow twice the worst measured model load.
STARTUP_FACTOR = 2.0


def measured_startup_s() -> float:
    """The worst measured cold start, as README states it ("loads in 30-50 s on a CPU")."""
    found = re.search(r"model loads in (\d+)-(\d+) s", README.read_text())
    assert found, "README no longer states the measured model load time"
    return float(found.group(2))


# ---------------------------------------------------------------------------- the platforms


@dataclass(frozen=True)
class Platform:
    """How one deployment path runs sluice: its environment and its timings."""

    name: str
    env: dict[str, str]
    config_yaml: str | None  # a SLUICE_CONFIG_FILE's content
    grace_s: float  # SIGTERM to SIGKILL, less any pre-stop delay
    startup_budgets_s: tuple[float, ...]


def _k8s_grace() -> float:
    spec = pod_spec()
    container = sluice_container()
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return float(spec["terminationGracePeriodSeconds"]) - float(command[1])


def _k8s_startup() -> float:
    container = sluice_container()
    probe = container["startupProbe"]
    return float(
        probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]
    )


def _k8s_env() -> dict[str, str]:
    container = sluice_container()
    env = image_env(container["image"].rsplit("-", 1)[-1])
    env.update({e["name"]: e["value"] for e in container["env"]})
    secret = k8s_object("Secret", container["envFrom"][0]["secretRef"]["name"])
    env.update({name: f"sk-test-{name}" for name in secret["stringData"]})
    return env


def _docker_run_stop_timeout() -> float:
    found = re.search(r"--stop-timeout[ =](\d+)", DEPLOY_DOC.read_text())
    assert found, "docs/deploy.md shows `docker run` without --stop-timeout"
    return float(found.group(1))


def _compose_platform(service: str) -> Platform:
    spec = compose()["services"][service]
    env = image_env(spec["build"]["target"]) | spec["environment"]
    return Platform(
        name=f"compose:{service}",
        env=env,
        config_yaml=None,
        grace_s=seconds(spec["stop_grace_period"]),
        startup_budgets_s=(seconds(spec["healthcheck"]["start_period"]),),
    )


def key_variables() -> set[str]:
    """The variables the shipped keys files read secrets from."""
    files = [IMAGE_KEYS_FILE.read_text(), configmap_entry("keys.yaml")]
    return {k["secret_env"] for text in files for k in yaml.safe_load(text)["keys"]}


def platforms() -> list[Platform]:
    fly_config = fly()
    fly_target = fly_config["build"]["build-target"]
    fly_checks = [*fly_config["http_service"]["checks"], *fly_config["checks"].values()]
    render_shutdown = render_service().get("maxShutdownDelaySeconds", RENDER_DEFAULT_SHUTDOWN_S)
    secrets = {name: f"sk-test-{name}" for name in key_variables()}
    stages = dockerfile_stages()
    found = [
        Platform(
            name=f"docker run ({name})",
            env=image_env(name) | {"SLUICE_GATEWAY__INSECURE_NO_AUTH": "true"},
            config_yaml=None,
            grace_s=_docker_run_stop_timeout(),
            startup_budgets_s=tuple(
                seconds(healthcheck_option(s, "start-period"))
                for s in stage_chain(stages, name)
                if s.all("HEALTHCHECK")
            )[-1:],
        )
        for name in ("cpu", "gpu")
    ]
    found += [_compose_platform("sluice"), _compose_platform("sluice-gpu")]
    found.append(
        Platform(
            name="kubernetes",
            env=_k8s_env(),
            config_yaml=configmap_entry("sluice.yaml"),
            grace_s=_k8s_grace(),
            startup_budgets_s=(_k8s_startup(),),
        )
    )
    found.append(
        Platform(
            name="fly",
            env=image_env(fly_target) | fly_config["env"] | secrets,
            config_yaml=None,
            grace_s=float(fly_config["kill_timeout"]),
            startup_budgets_s=tuple(seconds(c["grace_period"]) for c in fly_checks),
        )
    )
    found.append(
        Platform(
            name="render",
            env=image_env(stages[-1].name) | render_env() | secrets,
            config_yaml=None,
            grace_s=float(render_shutdown),
            startup_budgets_s=(),  # Render waits for the health check; no budget to set
        )
    )
    return found


PLATFORMS = platforms()
SettingsOf = Callable[[Platform], Settings]


@pytest.fixture
def settings_of(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SettingsOf:
    """Build the Settings a platform's process would get, with paths that live in the image
    moved to this machine (the cache to tmp_path, /etc/sluice to the repository's files)."""

    def build(platform: Platform) -> Settings:
        for name in list(os.environ):
            if name.startswith("SLUICE_"):
                monkeypatch.delenv(name)
        env = dict(platform.env)
        env["SLUICE_CACHE_DIR"] = str(tmp_path / "cache")
        for name in key_variables() & set(env):  # the keys' secrets; PATH and such stay
            monkeypatch.setenv(name, env[name])
        if env.get("SLUICE_GATEWAY__KEYS_FILE") == "/etc/sluice/keys.yaml":
            env["SLUICE_GATEWAY__KEYS_FILE"] = str(IMAGE_KEYS_FILE)
        if platform.config_yaml is not None:
            config = yaml.safe_load(platform.config_yaml)
            keys_file = Path(config.get("gateway", {}).get("keys_file", ""))
            if keys_file.name:
                local_keys = tmp_path / keys_file.name
                local_keys.write_text(configmap_entry(keys_file.name))
                config["gateway"]["keys_file"] = str(local_keys)
            path = tmp_path / "sluice.yaml"
            path.write_text(yaml.safe_dump(config))
            env["SLUICE_CONFIG_FILE"] = str(path)
        for name, value in env.items():
            if name.startswith("SLUICE_"):
                monkeypatch.setenv(name, value)
        return Settings()

    return build


# ---------------------------------------------------------------------------- variables


def test_every_sluice_variable_mentioned_is_a_setting() -> None:
    unknown = {}
    for path in DEPLOY_FILES:
        for name in ENV_NAME.findall(path.read_text()):
            if settings_path(name) is None:
                unknown[name] = path.relative_to(ROOT)
    assert not unknown, f"not settings: {unknown}"


def test_the_variable_check_can_fail() -> None:
    assert settings_path("SLUICE_GATEWAY__REDIS_URL") == ("gateway", "redis_url")
    assert settings_path("SLUICE_DRAIN_TIMEOUT_S") == ("drain_timeout_s",)
    assert settings_path("SLUICE_SERVER__PORT") is None
    assert settings_path("SLUICE_GATEWAY__REDIS") is None
    assert settings_path("SLUICE_PORT__X") is None
    assert settings_path("SLUICE_VLLM__MAX_NUM_SEQS") == ("vllm", "max_num_seqs")
    assert settings_path("SLUICE_VLLM__MAX_NUM_SEQ") is None


@pytest.mark.parametrize("platform", PLATFORMS, ids=lambda p: p.name)
def test_settings_load_and_the_server_agrees_to_start(
    platform: Platform, settings_of: SettingsOf
) -> None:
    """The platform's environment (and config file) is valid, and `sluice serve` would not
    refuse it: it binds beyond loopback only with keys, or with the explicit opt-out."""
    settings = settings_of(platform)
    assert settings.host == "0.0.0.0"
    assert open_bind_refusal(settings) is None


def test_the_image_alone_refuses_to_serve_without_keys(settings_of: SettingsOf) -> None:
    bare = Platform("image", image_env("cpu"), None, 0.0, ())
    refusal = open_bind_refusal(settings_of(bare))
    assert refusal is not None and "without API keys" in refusal


# ---------------------------------------------------------------------------- ports, paths


def test_every_port_is_the_server_port(settings_of: SettingsOf) -> None:
    port = Settings.model_fields["port"].default
    for platform in PLATFORMS:
        assert settings_of(platform).port == port, platform.name
    for platform in PLATFORMS:
        assert int(platform.env.get("SLUICE_PORT", port)) == port
    assert [int(e.args) for s in dockerfile_stages() for e in s.all("EXPOSE")] == [port]
    for service in ("sluice", "sluice-gpu"):
        assert [int(p.rsplit(":", 1)[1]) for p in compose()["services"][service]["ports"]] == [port]
    container = sluice_container()
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert k8s_object("Service", "sluice")["spec"]["ports"][0]["port"] == port
    config = fly()
    assert config["http_service"]["internal_port"] == port
    assert all(c["port"] == port for c in config["checks"].values())
    assert int(render_env()["PORT"]) == port
    prometheus = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0].endswith(f":{port}")


def used_paths() -> dict[str, set[str]]:
    """Every HTTP path a deployment probes or scrapes, with who uses it."""
    uses: dict[str, set[str]] = {}

    def use(path: str, by: str) -> None:
        uses.setdefault(path, set()).add(by)

    for stage in dockerfile_stages():
        if (path := healthcheck_path(stage)) is not None:
            use(path, f"Dockerfile {stage.name}")
    for name, service in compose()["services"].items():
        test = service.get("healthcheck", {}).get("test", [])
        if "/opt/sluice/probe.py" in test:
            use(test[-1], f"compose {name}")
    deployment = k8s_object("Deployment", "sluice")["spec"]["template"]
    (container,) = deployment["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        use(container[probe]["httpGet"]["path"], f"k8s {probe}")
    use(deployment["metadata"]["annotations"]["prometheus.io/path"], "k8s annotation")
    config = fly()
    for check in [*config["http_service"]["checks"], *config["checks"].values()]:
        use(check["path"], "fly check")
    use(config["metrics"]["path"], "fly metrics")
    use(render_service()["healthCheckPath"], "render")
    prometheus = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    use(prometheus["scrape_configs"][0]["metrics_path"], "prometheus.yml")
    return uses


def test_every_probed_path_is_a_route_that_answers() -> None:
    uses = used_paths()
    assert {"/healthz", "/readyz", "/metrics"} <= set(uses)
    engine = FakeEngine()
    app = create_app(Settings(model="fake"), engine=engine)
    routes = {getattr(r, "path", None) for r in app.routes if "GET" in getattr(r, "methods", ())}
    assert set(uses) <= routes, f"not routes: {set(uses) - routes}"
    with TestClient(app) as client:
        for _ in range(200):
            if client.get("/readyz").status_code == 200:
                break
        for path in uses:
            assert client.get(path).status_code == 200, path


# ---------------------------------------------------------------------------- metrics


def exposed_metric_names() -> set[str]:
    """Family and sample names of sluice's registry, engine gauges included."""
    metrics = Metrics()
    metrics.watch_engine(lambda: EngineStats(running=1, waiting=2, kv_cache_usage=0.5), str)
    metrics.watch_backends(lambda: {"b": {"breaker": "closed", "healthy": True, "outstanding": 0}})
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        names.update(family.name + s for s in suffixes.get(family.type, ()))
    return names


def test_every_metric_name_mentioned_exists() -> None:
    exposed = exposed_metric_names()
    assert "sluice_engine_waiting" in exposed and "sluice_made_up_total" not in exposed
    unknown = {}
    for path in METRIC_DOCUMENTS:
        for name in METRIC_NAME.findall(path.read_text()):
            if name not in exposed:
                unknown[name] = path.relative_to(ROOT)
    assert not unknown, f"not metrics of sluice: {unknown}"


# ---------------------------------------------------------------------------- timings


def test_startup_budgets_cover_twice_the_measured_load() -> None:
    need = STARTUP_FACTOR * measured_startup_s()
    for platform in PLATFORMS:
        for budget in platform.startup_budgets_s:
            assert budget >= need, f"{platform.name}: {budget:.0f}s < {need:.0f}s"
    assert any(p.startup_budgets_s for p in PLATFORMS)


@pytest.mark.parametrize("platform", PLATFORMS, ids=lambda p: p.name)
def test_drain_ends_before_the_platform_kills(platform: Platform, settings_of: SettingsOf) -> None:
    drain = settings_of(platform).drain_timeout_s
    assert SHUTDOWN_MARGIN_S > CUT_OFF_S
    need = drain + SHUTDOWN_MARGIN_S
    assert need <= platform.grace_s, f"{platform.name}: {need:.0f}s > {platform.grace_s:.0f}s"


def test_the_drain_check_reads_overrides(settings_of: SettingsOf) -> None:
    (render,) = [p for p in PLATFORMS if p.name == "render"]
    assert settings_of(render).drain_timeout_s == float(render_env()["SLUICE_DRAIN_TIMEOUT_S"])
    (kube,) = [p for p in PLATFORMS if p.name == "kubernetes"]
    assert (
        settings_of(kube).drain_timeout_s
        == yaml.safe_load(configmap_entry("sluice.yaml"))["drain_timeout_s"]
    )


@pytest.mark.parametrize("name", ["kubernetes", "fly", "render"])
def test_request_time_limit_fits_between_the_objective_and_the_proxy(
    name: str, settings_of: SettingsOf
) -> None:
    (platform,) = [p for p in PLATFORMS if p.name == name]
    settings = settings_of(platform)
    limit = settings.limits.request_timeout_s
    assert settings.telemetry.slo_latency_s < limit
    # Shortened from the default (600 s) on every managed platform...
    assert limit < LimitSettings().request_timeout_s
    # ...and ends a silent (non-streamed) request before Fly's proxy drops the connection.
    if name == "fly":
        idle = fly()["http_service"]["http_options"]["idle_timeout"]
        assert limit < idle

"""Settings: one pydantic-settings model for the whole server.

Precedence, highest first: command-line flags (passed as init arguments), environment
variables `SLUICE_*` (nested with `__`, e.g. `SLUICE_ENGINE__DTYPE=float32`), a YAML file
(`--config FILE` or `SLUICE_CONFIG_FILE`), then the defaults below. Nothing here is built at
import time: callers construct `Settings(...)` when they need one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    """Where sluice keeps provisioned models: `$SLUICE_CACHE_DIR` or `~/.cache/sluice`."""
    explicit = os.environ.get("SLUICE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sluice"


class EngineSettings(BaseModel):
    """Which engine serves, and sluice's own engine options. vLLM's engine options (dtype,
    context length, parallelism, ...) go in the `vllm:` section, unmapped."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["vllm", "synthetic"] = Field(
        "vllm", description="synthetic: vLLM's front end over a fake core (load tests only)"
    )
    synthetic_tokens_per_s: float = Field(
        50.0, gt=0, description="per-sequence token rate of the synthetic engine"
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="CPU only: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE; default 1)",
    )


class LimitSettings(BaseModel):
    """Per-request caps enforced before any engine work."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(1_048_576, ge=1024, description="largest request body, bytes")
    max_tokens_cap: int = Field(4096, ge=1, description="largest max_tokens a request may ask")
    max_n: int = Field(8, ge=1, description="largest n a request may ask")
    max_prompts: int = Field(16, ge=1, description="largest list of prompts in one completion")
    max_embedding_inputs: int = Field(
        2048, ge=1, description="largest list of inputs in one embeddings request (OpenAI's)"
    )
    request_timeout_s: float = Field(600.0, gt=0, description="per-request time limit, seconds")
    headers_timeout_s: float = Field(
        10.0, gt=0, description="seconds to receive a request's headers; then 408 and close"
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="seconds to receive a request's body after its headers"
    )
    max_connections: int = Field(
        2048, ge=1, description="open client connections; more get 503 and are closed"
    )


class ModelPrice(BaseModel):
    """USD per million tokens: given, or derived from a GPU's hourly price and throughput.

    Derived: a GPU costing `gpu_usd_per_hour` that serves `output_tokens_per_s` costs
    `gpu_usd_per_hour / (output_tokens_per_s * 3600) * 1e6` per million output tokens (and the
    same with `input_tokens_per_s` for input; input is free if its throughput is not given).
    """

    # Finite prices only: an infinite one makes NaN spend (inf * 0 tokens), which no budget
    # check catches and no store can record.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    input_usd_per_mtok: float = Field(0.0, ge=0)
    output_usd_per_mtok: float = Field(0.0, ge=0)
    gpu_usd_per_hour: float | None = Field(None, gt=0, description="derive prices from this")
    output_tokens_per_s: float | None = Field(None, gt=0, description="measured, for derivation")
    input_tokens_per_s: float | None = Field(None, gt=0, description="measured, for derivation")

    @model_validator(mode="after")
    def _derive(self) -> ModelPrice:
        if self.gpu_usd_per_hour is None:
            return self
        if self.output_tokens_per_s is None:
            raise ValueError("gpu_usd_per_hour needs output_tokens_per_s to derive a price")
        per_mtok = self.gpu_usd_per_hour / 3600 * 1_000_000
        self.output_usd_per_mtok = per_mtok / self.output_tokens_per_s
        if self.input_tokens_per_s is not None:
            self.input_usd_per_mtok = per_mtok / self.input_tokens_per_s
        if not (math.isfinite(self.input_usd_per_mtok) and math.isfinite(self.output_usd_per_mtok)):
            raise ValueError("the derived price is not a finite number: check the throughputs")
        return self

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (
            input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok
        ) / 1_000_000


class PricingSettings(BaseModel):
    """The price table: per served model id, else `default`."""

    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelPrice] = Field(default_factory=dict)
    default: ModelPrice = Field(default_factory=ModelPrice)

    def price_of(self, model: str) -> ModelPrice:
        return self.models.get(model, self.default)


class TelemetrySettings(BaseModel):
    """Logs and metrics."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="per-request metrics, log lines and traces (off: only engine gauges)"
    )
    log_format: Literal["json", "text"] | None = Field(
        None, description="log line format; unset: text on a terminal, JSON otherwise"
    )
    metrics_token: SecretStr | None = Field(
        None, description="if set, /metrics requires 'Authorization: Bearer <token>'"
    )
    log_prompts: bool = Field(
        False, description="add prompts and outputs to request log lines, redacted"
    )
    trace_sample_ratio: float = Field(1.0, ge=0, le=1, description="share of new traces kept")
    error_rate_threshold: float = Field(
        0.05, ge=0, le=1, description="above this recent 5xx share, keep every trace"
    )
    error_window_s: float = Field(60.0, gt=0, description="window of the recent error rate")
    error_min_requests: int = Field(20, ge=1, description="requests needed to judge the rate")
    slo_latency_s: float = Field(1.2, gt=0, description="latency objective (p95, end to end)")
    slo_max_prompt_tokens: int = Field(200, ge=1, description="requests the SLO covers: prompt")
    slo_max_output_tokens: int = Field(256, ge=1, description="requests the SLO covers: output")
    slo_ttft_s: float = Field(
        2.0, gt=0, description="time-to-first-token objective (p99); the alert rule's threshold"
    )


class GatewaySettings(BaseModel):
    """API keys and where keys, rate-limit windows and spend live."""

    model_config = ConfigDict(extra="forbid")

    store: Literal["embedded", "redis"] = Field(
        "embedded",
        description="embedded: SQLite (WAL) for keys and spend, memory for rate windows; "
        "redis: everything in Redis, shared by replicas",
    )
    database: Path | None = Field(None, description="SQLite file; None = <cache_dir>/sluice.db")
    redis_url: str | None = Field(None, description="redis://host:port/db for store=redis")
    redis_timeout_s: float = Field(0.25, gt=0, description="per Redis call; then fail open/closed")
    redis_failure: Literal["open", "closed"] = Field(
        "open",
        description="when Redis fails: open = local limits + warning + metric; closed = 503",
    )
    keys_file: Path | None = Field(None, description="declarative YAML keys file (GitOps)")
    admin_key: SecretStr | None = Field(
        None, description="enables /admin/* with 'Authorization: Bearer <admin key>'"
    )
    insecure_no_auth: bool = Field(
        False, description="allow binding beyond 127.0.0.1 with no API keys (not recommended)"
    )
    key_cache_s: float = Field(
        1.0, ge=0, description="how long a looked-up key is trusted before asking the store again"
    )

    budget_alert_thresholds: list[float] = Field(
        default_factory=lambda: [0.8, 1.0],
        description="shares of a key's budget whose crossing fires a metric, a log line and "
        "the webhook, once per budget window",
    )
    budget_webhook_url: str | None = Field(
        None, description="where budget alerts are POSTed as JSON; None = no webhook"
    )

    @field_validator("budget_alert_thresholds")
    @classmethod
    def _shares(cls, value: list[float]) -> list[float]:
        if any(not 0 < share <= 1 for share in value):
            raise ValueError("each threshold is a share of the budget, above 0 and at most 1")
        return sorted(set(value))

    @field_validator("admin_key", mode="before")
    @classmethod
    def _empty_admin_key_is_none(cls, value: object) -> object:
        """`SLUICE_GATEWAY__ADMIN_KEY=` (set but empty) leaves the admin API off, as unset
        does: no `Authorization` header could carry an empty key."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value


class AdmissionSettings(BaseModel):
    """Load shedding on the engine's queue, and the server-wide generation budget gate."""

    model_config = ConfigDict(extra="forbid")

    max_waiting: int | None = Field(
        None, ge=1, description="shed past this many requests waiting in the engine; None = off"
    )
    max_queued_tokens: int | None = Field(
        None, ge=1, description="shed past this many prompt tokens not yet started; None = off"
    )
    low_shed_from: float = Field(
        0.7, gt=0, lt=1, description="share of capacity where low priority starts to be shed"
    )
    high_headroom: float = Field(
        1.5, ge=1, description="high priority is shed only past this multiple of the caps"
    )
    gate_tokens_per_min: int | None = Field(
        None, ge=1, description="server-wide generated tokens/min that closes the gate; None = off"
    )
    gate_max_tokens: int = Field(
        256, ge=1, description="max_tokens for normal and low traffic while the gate is closed"
    )


class UpstreamTimeouts(BaseModel):
    """An upstream's time limits, seconds, kept exactly (aiohttp's rounding up to whole
    seconds is off). `first_token_s` runs from sending the request to the first streamed
    event, and bounds each wait for the next; `total_s` bounds a whole answer that is not
    streamed (it comes when generation ends); the server's `limits.request_timeout_s` still
    applies to both."""

    model_config = ConfigDict(extra="forbid")

    connect_s: float = Field(5.0, gt=0, description="to open a connection")
    first_token_s: float = Field(60.0, gt=0, description="to the first streamed event")
    total_s: float = Field(600.0, gt=0, description="to the end of the answer")


class BackendSettings(BaseModel):
    """One upstream OpenAI-compatible server (another sluice, `vllm serve`, llama.cpp's
    server, a paid API)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="label in metrics")
    base_url: str = Field(description="up to and including /v1, e.g. http://host:8000/v1")
    api_key_env: str | None = Field(
        None, description="environment variable holding the upstream's API key"
    )
    models: dict[str, str] = Field(
        description="served name → the upstream's model name (the same name if unmapped)"
    )
    pricing: dict[str, ModelPrice] = Field(
        default_factory=dict, description="per served name; else the server's price table"
    )
    timeouts: UpstreamTimeouts = Field(default_factory=UpstreamTimeouts)
    max_concurrent: int | None = Field(
        None, ge=1, description="requests in flight to this upstream; past it, the next one"
    )
    health_check_interval_s: float | None = Field(
        10.0, gt=0, description="GET /models this often; None = passive ejection only"
    )

    @field_validator("models", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        """A plain list of names means no mapping."""
        return {name: name for name in value} if isinstance(value, list) else value

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class RouteSettings(BaseModel):
    """A routing alias: per request, the cheapest of `models` that meets its constraints."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(min_length=1, description="candidates (served names)")
    max_usd_per_mtok: float | None = Field(
        None, ge=0, description="price ceiling: output USD per million tokens"
    )
    max_ttft_s: float | None = Field(
        None, gt=0, description="latency ceiling: the model's recent p50 time to first token"
    )


class CascadeSettings(BaseModel):
    """A cascade alias: try `models` in order, escalating when a signal fires."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(min_length=2, description="cheapest first (served names)")
    escalate_on: list[Literal["length", "schema", "logprob"]] = Field(
        default=["length", "schema"],
        description="length: finish_reason length; schema: output fails response_format's "
        "JSON schema; logprob: mean token logprob under min_mean_logprob",
    )
    min_mean_logprob: float = Field(-1.0, le=0, description="threshold of the logprob signal")


class ModelSpec(BaseModel):
    """What sluice knows of a served model, for routing."""

    model_config = ConfigDict(extra="forbid")

    context_length: int | None = Field(None, ge=1, description="prompt + output tokens")
    tags: list[str] = Field(
        default_factory=list, description="capabilities: tools, vision, json_schema, ..."
    )


class RoutingSettings(BaseModel):
    """Names clients use and what answers them: aliases, fallbacks, retries, breakers."""

    model_config = ConfigDict(extra="forbid")

    aliases: dict[str, str] = Field(default_factory=dict, description="alias → served name")
    fallbacks: dict[str, list[str]] = Field(
        default_factory=dict, description="served name → models tried next, in order"
    )
    routes: dict[str, RouteSettings] = Field(default_factory=dict)
    cascades: dict[str, CascadeSettings] = Field(default_factory=dict)
    models: dict[str, ModelSpec] = Field(default_factory=dict, description="per served name")
    static_fallback: dict[str, str] = Field(
        default_factory=dict,
        description="served name → the message answered when every backend failed",
    )
    retries: int = Field(1, ge=0, description="retries of one model before its fallbacks")
    retry_budget: float = Field(
        0.2, ge=0, le=1, description="retries at most this share of requests (10 s window)"
    )
    retry_backoff_s: float = Field(0.05, ge=0, description="first retry's backoff, doubling")
    breaker_failures: int = Field(
        5, ge=1, description="consecutive failures that open a backend's circuit breaker"
    )
    breaker_recovery_s: float = Field(
        10.0, gt=0, description="seconds an open breaker waits before a half-open probe"
    )


class Settings(BaseSettings):
    """Everything `sluice serve` needs; see module docstring for precedence."""

    model_config = SettingsConfigDict(
        env_prefix="SLUICE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    config_file: Path | None = Field(None, description="YAML file with any of these settings")
    model: str | None = Field(
        None, description="hub id or model folder, as vllm serve takes it; None = default model"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    cache_dir: Path = Field(default_factory=default_cache_dir)
    drain_timeout_s: float = Field(
        30.0, ge=0, description="seconds SIGTERM waits for requests in flight"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    engine: EngineSettings = Field(default_factory=EngineSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    pricing: PricingSettings = Field(default_factory=PricingSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    backends: list[BackendSettings] = Field(
        default_factory=list, description="upstream OpenAI-compatible servers"
    )
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    vllm: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM's serve options by name (as in vLLM's --config YAML), passed to "
        "vLLM's own parser",
    )

    @field_validator("model")
    @classmethod
    def _empty_model(cls, value: str | None) -> str | None:
        """An empty `SLUICE_MODEL` (compose's `${SLUICE_MODEL:-}`) means the default model."""
        return value or None

    @property
    def database_path(self) -> Path:
        """The SQLite file of the embedded store."""
        return self.gateway.database or self.cache_dir / "sluice.db"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = _yaml_path(init_settings)
        if yaml_file is not None:
            if not yaml_file.is_file():
                raise FileNotFoundError(f"config file {yaml_file} does not exist")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


def _yaml_path(init_settings: PydanticBaseSettingsSource) -> Path | None:
    init_kwargs: dict[str, Any] = (
        init_settings.init_kwargs if isinstance(init_settings, InitSettingsSource) else {}
    )
    raw = init_kwargs.get("config_file") or os.environ.get("SLUICE_CONFIG_FILE")
    return Path(raw) if raw else None


def nested_overrides(values: Mapping[str, Any]) -> dict[str, Any]:
    """`{"gateway.store": "redis"}` as `Settings(**...)` takes it: `{"gateway": {"store":
    "redis"}}`; None values (a flag not given) are left out."""
    overrides: dict[str, Any] = {}
    for path, value in values.items():
        if value is None:
            continue
        node = overrides
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return overrides

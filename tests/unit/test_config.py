"""Settings precedence (flags > env > YAML > defaults) and the CLI flags that feed it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sluice import cli
from sluice.config import ModelPrice, Settings, default_cache_dir


def settings(**kwargs: object) -> Settings:
    return Settings(_env_file=None, **kwargs)  # type: ignore[call-arg]


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def yaml_file(tmp_path: Path) -> Path:
    return write_yaml(
        tmp_path / "sluice.yaml",
        "port: 9000\n"
        "log_level: warning\n"
        "vllm:\n"
        "  dtype: bfloat16\n"
        "  max_num_seqs: 4\n"
        "engine:\n"
        "  kv_cache_gib: 2\n"
        "limits:\n"
        "  max_n: 2\n",
    )


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path))
    s = settings()
    assert s.config_file is None
    assert s.model is None
    assert (s.host, s.port, s.log_level) == ("127.0.0.1", 8000, "info")
    assert s.drain_timeout_s == 30.0
    assert s.engine.kind == "vllm"
    assert s.engine.kv_cache_gib is None
    assert s.vllm == {}
    assert s.limits.request_timeout_s == 600.0
    assert s.limits.max_body_bytes == 1_048_576
    assert s.limits.max_tokens_cap == 4096
    assert s.limits.max_n == 8


def test_yaml_file_from_init_argument(yaml_file: Path) -> None:
    s = settings(config_file=yaml_file)
    assert s.port == 9000
    assert s.log_level == "warning"
    assert s.vllm == {"dtype": "bfloat16", "max_num_seqs": 4}
    assert s.engine.kv_cache_gib == 2
    assert s.limits.max_n == 2
    assert s.limits.max_tokens_cap == 4096  # not in the file: default


def test_yaml_file_from_env(monkeypatch: pytest.MonkeyPatch, yaml_file: Path) -> None:
    monkeypatch.setenv("SLUICE_CONFIG_FILE", str(yaml_file))
    s = settings()
    assert s.port == 9000
    assert s.vllm["max_num_seqs"] == 4
    assert s.config_file == yaml_file


def test_init_config_file_wins_over_env_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, yaml_file: Path
) -> None:
    other = write_yaml(tmp_path / "other.yaml", "port: 7000\n")
    monkeypatch.setenv("SLUICE_CONFIG_FILE", str(other))
    assert settings(config_file=yaml_file).port == 9000


def test_env_beats_yaml_field_by_field(monkeypatch: pytest.MonkeyPatch, yaml_file: Path) -> None:
    monkeypatch.setenv("SLUICE_PORT", "9100")
    monkeypatch.setenv("SLUICE_LIMITS__MAX_TOKENS_CAP", "8")
    s = settings(config_file=yaml_file)
    assert s.port == 9100
    assert s.limits.max_tokens_cap == 8
    # siblings of an overridden nested field still come from the file
    assert s.log_level == "warning"
    assert s.limits.max_n == 2


def test_init_beats_env_and_yaml_field_by_field(
    monkeypatch: pytest.MonkeyPatch, yaml_file: Path
) -> None:
    monkeypatch.setenv("SLUICE_PORT", "9100")
    monkeypatch.setenv("SLUICE_LIMITS__MAX_TOKENS_CAP", "8")
    monkeypatch.setenv("SLUICE_LIMITS__MAX_PROMPTS", "7")
    s = settings(config_file=yaml_file, port=9200, limits={"max_tokens_cap": 16})
    assert s.port == 9200
    assert s.limits.max_tokens_cap == 16
    assert s.limits.max_prompts == 7  # from env: init only replaced the one nested key it named
    assert s.limits.max_n == 2  # from the file


def test_nested_env_values_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_VLLM__ENABLE_PREFIX_CACHING", "false")
    monkeypatch.setenv("SLUICE_ENGINE__KV_CACHE_GIB", "1.5")
    monkeypatch.setenv("SLUICE_LIMITS__REQUEST_TIMEOUT_S", "2.5")
    monkeypatch.setenv("SLUICE_LOG_LEVEL", "debug")
    s = settings()
    assert s.vllm == {"enable_prefix_caching": "false"}  # read by vLLM's parser (engine/args.py)
    assert s.engine.kv_cache_gib == 1.5
    assert s.limits.request_timeout_s == 2.5
    assert s.log_level == "debug"


def test_missing_yaml_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml does not exist"):
        settings(config_file=tmp_path / "nope.yaml")


def test_missing_yaml_file_from_env_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLUICE_CONFIG_FILE", str(tmp_path / "nope.yaml"))
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml does not exist"):
        settings()


def test_unknown_init_key_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        settings(max_num_seqs=4)  # belongs under vllm
    assert info.value.errors()[0]["type"] == "extra_forbidden"
    assert info.value.errors()[0]["loc"] == ("max_num_seqs",)


def test_unknown_top_level_yaml_key_rejected(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "typo.yaml", "prot: 9000\n")
    with pytest.raises(ValidationError) as info:
        settings(config_file=config)
    assert info.value.errors()[0]["type"] == "extra_forbidden"
    assert info.value.errors()[0]["loc"] == ("prot",)


@pytest.mark.parametrize(
    "yaml_text",
    ["engine:\n  kv_cache: 4\n", "limits:\n  max_token_cap: 10\n"],
    ids=["engine", "limits"],
)
def test_unknown_nested_yaml_key_rejected(tmp_path: Path, yaml_text: str) -> None:
    config = write_yaml(tmp_path / "typo.yaml", yaml_text)
    with pytest.raises(ValidationError):
        settings(config_file=config)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": 70000},
        {"port": -1},
        {"log_level": "verbose"},
        {"engine": {"kv_cache_gib": 0}},
        {"engine": {"kind": "llama"}},
        {"limits": {"request_timeout_s": 0}},
        {"limits": {"max_body_bytes": 10}},
    ],
)
def test_out_of_range_values_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        settings(**kwargs)


def test_bad_env_value_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_LIMITS__MAX_N", "many")
    with pytest.raises(ValidationError) as info:
        settings()
    assert info.value.errors()[0]["loc"] == ("limits", "max_n")


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "sluice"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "sluice"
    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    assert settings().cache_dir == tmp_path / "explicit"


# --- command-line flags -------------------------------------------------------------------


def from_flags(*flags: str) -> Settings:
    args, extra = cli.build_parser().parse_known_args(["serve", *flags])
    assert extra == []
    return cli.settings_from_args(args)


def test_flags_map_onto_nested_settings() -> None:
    s = from_flags(
        "--request-timeout",
        "2.5",
        "--kv-cache-gib",
        "2",
        "--engine",
        "synthetic",
        "--port",
        "9001",
        "--max-tokens-cap",
        "128",
        "--model",
        "org/name",
    )
    assert s.limits.request_timeout_s == 2.5
    assert s.engine.kv_cache_gib == 2
    assert s.engine.kind == "synthetic"
    assert s.port == 9001
    assert s.limits.max_tokens_cap == 128
    assert s.model == "org/name"


def test_other_flags_are_left_for_vllm() -> None:
    args, extra = cli.build_parser().parse_known_args(
        ["serve", "org/name", "--max-model-len", "512", "--port", "9001", "--enforce-eager"]
    )
    assert args.port == 9001
    assert extra == ["org/name", "--max-model-len", "512", "--enforce-eager"]


def test_flags_left_out_leave_env_in_charge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_LIMITS__MAX_N", "3")
    monkeypatch.setenv("SLUICE_LIMITS__REQUEST_TIMEOUT_S", "9")
    s = from_flags("--max-n", "4")
    assert s.limits.max_n == 4  # flag wins
    assert s.limits.request_timeout_s == 9.0  # env, untouched by the sibling flag


def test_config_flag_reads_yaml_under_flags_and_env(
    monkeypatch: pytest.MonkeyPatch, yaml_file: Path
) -> None:
    monkeypatch.setenv("SLUICE_LIMITS__MAX_N", "3")
    s = from_flags("--config", str(yaml_file), "--port", "9300")
    assert s.config_file == yaml_file
    assert s.port == 9300  # flag over file
    assert s.limits.max_n == 3  # env over file
    assert s.vllm["max_num_seqs"] == 4  # file over default


def test_no_flags_means_no_overrides() -> None:
    args, _ = cli.build_parser().parse_known_args(["serve"])
    assert all(getattr(args, flag[2:].replace("-", "_")) is None for flag in cli.SERVE_FLAGS)


@pytest.mark.parametrize("flag", sorted(cli.SERVE_FLAGS))
def test_every_flag_names_a_real_setting(flag: str) -> None:
    path, _options = cli.SERVE_FLAGS[flag]
    model: type = Settings
    *parents, leaf = path.split(".")
    for part in parents:
        model = model.model_fields[part].annotation  # type: ignore[attr-defined]
    assert leaf in model.model_fields  # type: ignore[attr-defined]


def test_cli_reports_invalid_setting_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sluice: invalid setting port: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_cli_reports_missing_config_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli.main(["serve", "--config", str(tmp_path / "gone.yaml")]) == 1
    err = capsys.readouterr().err
    assert err == f"sluice: config file {tmp_path / 'gone.yaml'} does not exist\n"


def test_cli_model_path_prints_the_default_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli.main(["model", "path", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"{tmp_path}/models/SmolLM2-135M-Instruct\n"


@pytest.mark.parametrize(
    "price",
    [
        {"output_usd_per_mtok": float("inf")},
        {"input_usd_per_mtok": float("nan")},
        {"gpu_usd_per_hour": 1.0, "output_tokens_per_s": 1e-320},  # derives to infinity
    ],
)
def test_a_price_is_a_finite_number(price: dict[str, float]) -> None:
    """An infinite price makes NaN spend (inf times 0 tokens) that no budget catches."""
    with pytest.raises(ValidationError):
        ModelPrice(**price)


def test_an_empty_admin_key_leaves_the_admin_api_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_GATEWAY__ADMIN_KEY", "")
    assert Settings(_env_file=None).gateway.admin_key is None  # type: ignore[call-arg]

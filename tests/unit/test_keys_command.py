"""`sluice keys …` on the embedded store, the open-bind refusal, and derived prices."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from sluice.cli import main
from sluice.config import ModelPrice, Settings
from sluice.gateway.command import is_loopback, open_bind_refusal
from sluice.gateway.keys import digest


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_keys_create_list_usage_revoke(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create", "team-a", "--rpm", "5", "--budget-usd", "2"]) == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    assert secret.startswith("sk-sluice-")
    assert secret not in (cache / "sluice.db").read_bytes().decode(errors="ignore")
    assert main(["keys", "create", "team-a"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert "team-a" in listed and secret not in listed
    assert main(["keys", "usage", "team-a", "--json"]) == 0
    assert '"tokens": 0' in capsys.readouterr().out
    assert main(["keys", "revoke", "team-a"]) == 0
    assert main(["keys", "revoke", "team-a"]) == 1
    assert "No live key" in capsys.readouterr().err


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")


def test_an_open_server_may_only_bind_loopback(cache: Path, tmp_path: Path) -> None:
    assert open_bind_refusal(Settings(host="127.0.0.1")) is None
    refusal = open_bind_refusal(Settings(host="0.0.0.0"))
    assert refusal is not None and "--insecure-no-auth" in refusal
    assert open_bind_refusal(Settings(host="0.0.0.0", gateway={"insecure_no_auth": True})) is None
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(
        yaml.safe_dump({"keys": [{"name": "a", "secret_sha256": digest("sk-x-1234567890")}]})
    )
    assert open_bind_refusal(Settings(host="0.0.0.0", gateway={"keys_file": keys_file})) is None
    assert main(["keys", "create", "stored"]) == 0
    assert open_bind_refusal(Settings(host="0.0.0.0")) is None


def test_serve_refuses_an_open_non_loopback_bind(
    cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--host", "0.0.0.0", "--engine", "synthetic"]) == 2
    assert "refusing to serve on 0.0.0.0 without API keys" in capsys.readouterr().err


def test_a_bad_keys_file_stops_serve_with_one_sentence(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "keys.yaml"
    bad.write_text(yaml.safe_dump({"keys": [{"name": "a"}]}))
    args = ["serve", "--host", "0.0.0.0", "--engine", "synthetic", "--keys-file", str(bad)]
    assert main(args) == 2
    assert "give exactly one of secret_sha256 and secret_env" in capsys.readouterr().err


def test_prices_derive_from_a_gpu_hour_and_throughput() -> None:
    price = ModelPrice(gpu_usd_per_hour=3.6, output_tokens_per_s=1000, input_tokens_per_s=4000)
    assert price.output_usd_per_mtok == pytest.approx(1.0)  # $3.6/h over 3.6M tokens/h
    assert price.input_usd_per_mtok == pytest.approx(0.25)
    with pytest.raises(ValidationError, match="output_tokens_per_s"):
        ModelPrice(gpu_usd_per_hour=2.0)


@pytest.mark.parametrize("where", ["before", "after"])
def test_keys_take_the_store_before_or_after_the_command(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """No settings file needed: `--database` (or `--redis-url`, `--config`) on either side."""
    database = tmp_path / "elsewhere.db"
    store = ["--database", str(database)]

    def keys(*words: str) -> list[str]:
        command, *rest = words
        return ["keys", *store, command, *rest] if where == "before" else ["keys", *words, *store]

    assert main(keys("create", "team-b", "--tpm", "100")) == 0
    assert database.exists() and not (cache / "sluice.db").exists()
    capsys.readouterr()
    assert main(keys("list")) == 0
    assert "team-b" in capsys.readouterr().out
    assert main(["keys", "list"]) == 0  # the default store has no such key
    assert "team-b" not in capsys.readouterr().out
    config = tmp_path / "sluice.yaml"
    config.write_text(yaml.safe_dump({"gateway": {"database": str(database)}}))
    assert main(["keys", "list", "--config", str(config)]) == 0
    assert "team-b" in capsys.readouterr().out


def test_version_names_sluice_and_vllm(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("sluice 0.") and "(vLLM 0.32" in out


def test_every_serve_flag_has_help_and_shows_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--port PORT port to listen on (default: 8000)" in text
    assert "--headers-timeout HEADERS_TIMEOUT seconds to receive a request's headers" in text
    from sluice.cli import SERVE_FLAGS, flag_help

    for flag, (path, options) in SERVE_FLAGS.items():
        assert flag_help(path, options.get("help")), f"{flag} has no help"


def test_keys_update_and_rotate_from_the_command_line(
    cache: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    assert main(["keys", "create", "svc", "--rpm", "5"]) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    with caplog.at_level("INFO", logger="sluice.audit"):
        assert main(["keys", "update", "svc", "--tpm", "900", "--clear", "rpm"]) == 0
        assert (
            main(
                [
                    "keys",
                    "update",
                    "svc",
                    "--max-concurrent",
                    "3",
                    "--expires-at",
                    "2030-01-01T00:00Z",
                ]
            )
            == 0
        )
        assert main(["keys", "update", "svc"]) == 1  # nothing to change
        assert "Nothing to change" in capsys.readouterr().err
        assert main(["keys", "rotate", "svc", "--grace", "inf"]) == 1
        assert "grace_s must be between 0 and" in capsys.readouterr().err
        assert main(["keys", "update", "svc", "--budget-usd", "inf"]) == 1
        assert "budget_usd" in capsys.readouterr().err
        assert main(["keys", "rotate", "svc", "--grace", "60"]) == 0
    second = capsys.readouterr().out.strip().splitlines()[-1]
    assert second.startswith("sk-sluice-") and second != first
    assert main(["keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert "rotated" in listed and first not in listed and second not in listed
    audit = [r for r in caplog.records if r.name == "sluice.audit"]
    actions = [(r.action, r.actor.startswith("cli:")) for r in audit]  # type: ignore[attr-defined]
    assert actions[-3:] == [("update", True), ("update", True), ("rotate", True)]
    after = audit[-2].after  # type: ignore[attr-defined]
    assert (after["rpm"], after["tpm"], after["max_concurrent"]) == (None, 900, 3)
    assert after["expires_at"] == "2030-01-01T00:00:00Z"


def test_a_stored_key_that_a_keys_file_key_shares_its_name_with_can_be_revoked(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key stored first and a keys-file key of the same name added later: the stored one's
    secret must still be revocable (the store is asked first), and only then is the name
    the file's (409-like refusal)."""
    assert main(["keys", "create", "team-a"]) == 0
    capsys.readouterr()
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(
        yaml.safe_dump({"keys": [{"name": "team-a", "secret_sha256": digest("sk-x-1234567890")}]})
    )
    monkeypatch.setenv("SLUICE_GATEWAY__KEYS_FILE", str(keys_file))
    assert main(["keys", "revoke", "team-a"]) == 0
    assert main(["keys", "revoke", "team-a"]) == 1
    assert "keys file" in capsys.readouterr().err

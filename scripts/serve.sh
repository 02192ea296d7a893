#!/usr/bin/env bash
# Set up (first run only) and start `sluice serve` on the default model; extra arguments go to
# `sluice serve` (e.g. --port 9000, --model /path/to/hf-folder).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/sluice serve "$@"

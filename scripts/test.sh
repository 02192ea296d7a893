#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite: lint, types, unit, API and end-to-end
# tiers. End-to-end tests start real `sluice serve` processes on the real vLLM engine and the
# default model (pulled on first use). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
SLUICE_EXTRAS=dev scripts/setup.sh
.venv/bin/sluice model pull
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
exec .venv/bin/pytest "$@"

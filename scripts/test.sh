#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite: lint, types, unit, API and end-to-end
# tiers. End-to-end tests start real `sluice serve` processes on the real vLLM engine and the
# default model (pulled on first use). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
SLUICE_EXTRAS=dev scripts/setup.sh
.venv/bin/sluice model pull
# A real Prometheus (Debian's package) for the metrics tests.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "note: install Debian's prometheus package to run the Prometheus tests" >&2
  fi
fi
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
exec .venv/bin/pytest "$@"

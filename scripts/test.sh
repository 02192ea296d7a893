#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite: lint, types, unit, API and end-to-end
# tiers. End-to-end tests start real `sluice serve` processes on the real vLLM engine and the
# default model (pulled on first use). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
SLUICE_EXTRAS=dev scripts/setup.sh
.venv/bin/sluice model pull
# A real Prometheus and a real Redis (Debian's packages) for the metrics and gateway tests;
# the tests start their own servers on free ports.
missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v redis-server >/dev/null || missing+=(redis-server)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "note: install Debian's ${missing[*]} to run the Prometheus and Redis tests" >&2
  fi
fi
.venv/bin/ruff check src tests benchmarks deploy
.venv/bin/ruff format --check src tests benchmarks deploy
.venv/bin/mypy
exec .venv/bin/pytest "$@"

#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite: lint, types, unit, deploy, API and
# end-to-end tiers. End-to-end tests start real `sluice serve` processes on the real vLLM
# engine and the default model (pulled on first use). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '==> %s\n' "$*" >&2; }

SLUICE_EXTRAS=dev scripts/setup.sh
step "the default model (pulled and converted on first use only)"
.venv/bin/sluice model pull
# The metrics and gateway tests run a real Prometheus and a real Redis (the tests start their
# own servers on free ports). Missing ones come from Debian's packages, installed system-wide,
# which needs root and apt-get; elsewhere those tests are skipped (and fail under CI=true).
missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v redis-server >/dev/null || missing+=(redis-server)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    step "installing Debian's ${missing[*]} system-wide (apt-get, as root) for the Prometheus and Redis tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    step "not installing ${missing[*]} (needs root and apt-get): their tests are skipped; install them to run those tests"
  fi
fi
step "client libraries for the end-to-end client tests (a virtualenv each, made once under ~/.cache/sluice/clients)"
.venv/bin/python -m tests.clients.venvs
step "ruff"
.venv/bin/ruff check src tests benchmarks deploy
.venv/bin/ruff format --check src tests benchmarks deploy
step "mypy"
.venv/bin/mypy
step "pytest"
# the slowest tests at the end of the report: where the run's time goes
exec .venv/bin/pytest --durations=25 "$@"

#!/usr/bin/env bash
# Refresh constraints.txt: resolve the CPU stack with the development tools afresh in a
# throwaway virtualenv (scripts/setup.sh without constraints) and write what pip installed.
# scripts/setup.sh and the Dockerfile's CPU image install with these pins. Run it when
# pyproject.toml's dependencies change, then run scripts/test.sh and commit both files.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
SLUICE_VENV="$work/venv" SLUICE_EXTRAS=dev SLUICE_CONSTRAINTS=none scripts/setup.sh
{
  echo "# pip constraints for the CPU stack and the development tools: what scripts/test.sh"
  echo "# ran on. Written by scripts/lock.sh ($(date -u +%Y-%m-%d)); do not edit by hand."
  # torch: the pin without its local build tag (2.13.0 matches the +cpu wheel either way)
  "$work/venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check |
    sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/' | LC_ALL=C sort -f
} > constraints.txt
echo "==> wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)" >&2

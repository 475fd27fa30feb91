#!/usr/bin/env bash
# Create .venv and install scaler-wizard (editable) with its dev tools. Idempotent.
# CPU machines: constraints.txt pins the CPU build of torch. Needs only python3 (>= 3.10).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  -c constraints.txt -e ".[dev]" --config-settings editable_mode=strict

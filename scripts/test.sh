#!/usr/bin/env bash
# Set up .venv, then lint, type-check and run the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check core plugins banks manifests cli bench examples tests
.venv/bin/mypy
.venv/bin/lint-imports  # the part rules: [tool.importlinter] in pyproject.toml
set +e
# two workers, the 2 CPUs the suite is sized for (TEST_WORKERS=N overrides; 0 runs in this
# process); a test file stays on one worker, so its module fixtures are built once
.venv/bin/pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-2}" --dist loadfile --durations=20 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"

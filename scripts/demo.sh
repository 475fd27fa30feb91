#!/usr/bin/env bash
# The main job on the bundled defaults: compose a model on all-MiniLM-L6-v2, grow it two
# branches on real data (SMS spam, TREC questions), predict with both, verify, show history.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
export SCALER_HOME="${SCALER_HOME:-$PWD/demo-store}"
scaler() { .venv/bin/scaler "$@"; }
step() { printf '\n\033[1m$ scaler %s\033[0m\n' "$*"; scaler "$@"; }

if [ -e "$SCALER_HOME/refs/models/demo" ]; then
  echo "model 'demo' already exists in $SCALER_HOME: remove that folder to rerun the demo from scratch" >&2
  exit 1
fi
step init demo
step show demo
step branch add demo spam --data data/sms_spam.csv
step branch add demo trec --data data/trec.csv
step branch list demo
step predict demo --all-branches \
  "WINNER!! You have been selected for a free holiday, text CLAIM to 80088 now" \
  "Are you coming to the pub tonight?" \
  "What is the tallest mountain in Africa?" \
  "Who invented the telephone?"
step branch show demo trec   # held-out metrics, provenance, fingerprint
step verify demo --deep
step history demo

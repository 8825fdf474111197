#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite offline, in a fixed order. Extra arguments go to pytest, e.g.
#   bash scripts/run_tests.sh -p random_order --random-order-seed=1234    # a shuffled order (pytest-random-order)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/_python.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" -m pytest -q "$@"

#!/usr/bin/env bash
# Set up (idempotent) and run the main job: train PaLoRA on MultiMNIST with Accelerate, evaluate its Pareto front.
# Extra arguments go to examples/train_mtl.py, e.g. `bash scripts/run_main.sh --max_steps 20`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/_python.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no \
  --dynamo_backend no examples/train_mtl.py "$@"

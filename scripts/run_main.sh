#!/usr/bin/env bash
# Set up (idempotent) and run the main job: train PaLoRA on MultiMNIST with Accelerate, evaluate its Pareto front.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  examples/train_mtl.py "$@"

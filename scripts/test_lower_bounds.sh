#!/usr/bin/env bash
# Run the tuner, persistence, Hub and training tests against the LOWEST versions pyproject.toml claims for the
# libraries whose internals PaLoRA touches (peft, transformers). The newest versions are what scripts/setup.sh
# installs, so the two runs together test both ends of the claimed ranges.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LOWER_BOUNDS_VENV:-.venv-lower-bounds}
"$PY" -m venv --system-site-packages "$VENV"   # reuse torch and the rest; override only the pinned libraries
"$VENV/bin/python" -m pip install --quiet "peft==0.21.0" "transformers==5.20.0"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$VENV/bin/python" -c "import peft, transformers; print('lower bounds: peft', peft.__version__, 'transformers', transformers.__version__)"
exec "$VENV/bin/python" -m pytest -q tests/test_tuner.py tests/test_persistence.py tests/test_registration.py \
  tests/test_hub.py tests/test_training.py

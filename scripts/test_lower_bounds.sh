#!/usr/bin/env bash
# Run the tuner, persistence, Hub and training tests against the LOWEST versions pyproject.toml claims for the
# libraries whose internals PaLoRA touches (peft, transformers), in a virtual environment of their own that
# scripts/setup.sh fills like any other (pip takes the packages from its cache). These two pins replace the lock's
# (requirements/lock.txt, which holds every other package where a plain setup has it); a plain setup installs the
# locked versions, near the newest releases, so the two runs together test both ends of the claimed ranges.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LOWER_BOUNDS_VENV:-.venv-lower-bounds}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf 'peft==0.21.0\ntransformers==5.20.0\n' >"$constraints"
PYTHON=$VENV/bin/python PALORA_PIP_CONSTRAINT=$constraints bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$VENV/bin/python" -c "import peft, transformers; print('lower bounds: peft', peft.__version__, 'transformers', transformers.__version__)"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_tuner.py tests/test_persistence.py \
  tests/test_registration.py tests/test_hub.py tests/test_training.py

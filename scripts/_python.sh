# Sourced by the scripts in this folder: picks the Python interpreter to install into and run with, as $PY.
#   $PYTHON, when set, wins;
#   else the active virtual environment's python (VIRTUAL_ENV set, e.g. after `source .venv/bin/activate`);
#   else this checkout's own .venv, created on first use -- the machine's own site-packages are never touched.
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  PY=$VIRTUAL_ENV/bin/python
else
  if [ ! -x .venv/bin/python ]; then
    echo "creating the virtual environment .venv ..." >&2
    python3 -m venv .venv
  fi
  PY=$PWD/.venv/bin/python
fi
export PY

#!/usr/bin/env bash
# Recompile requirements/lock.txt, the exact versions scripts/setup.sh installs (as pip constraints), for CPython 3.11
# on Linux x86_64 with torch's CPU build. Compiled from pyproject.toml (its dependencies and every extra),
# requirements/lock.in and the constraints in requirements/lock-constraints.in, with uv in a throwaway virtual
# environment (never ./.venv). Versions already in the lock are kept unless a change needs others; arguments go to
# `uv pip compile`:
#   bash scripts/lock.sh                             # after editing pyproject.toml or lock.in: add/drop, keep the rest
#   bash scripts/lock.sh --upgrade                   # every package to its newest allowed release
#   bash scripts/lock.sh --upgrade-package datasets  # one package (repeatable)
# Then: bash scripts/setup.sh && bash scripts/run_tests.sh, and commit the lock with what needed it.
# torch's CPU build is looked for in pip's configured find-links (this machine: /opt/wheels) or in
# $PALORA_LOCK_FIND_LINKS (space-separated folders or pages); PyPI's own torch wheel is the CUDA one and would drag
# the nvidia-* packages into the lock, so the script refuses that.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VENV=${PALORA_UV_VENV:-${TMPDIR:-/tmp}/palora-lock-uv}
UV_VERSION=0.13.9
if ! "$UV_VENV/bin/uv" --version 2>/dev/null | grep -q " $UV_VERSION\b"; then
  echo "lock: installing uv $UV_VERSION into $UV_VENV ..." >&2
  [ -x "$UV_VENV/bin/python" ] || python3 -m venv "$UV_VENV"
  "$UV_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" 2>&1 \
    | grep -v "^WARNING: Location '.*' is ignored" >&2 || true
fi
links=${PALORA_LOCK_FIND_LINKS:-"${PIP_FIND_LINKS:-} $(python3 -m pip config list 2>/dev/null \
  | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p")"}
find_links=()
for link in $(printf '%s\n' $links | sort -u); do find_links+=(--find-links "$link"); done
out=$(mktemp)
trap 'rm -f "$out"' EXIT
# uv keeps the versions it finds in the output file; torch's, with the +cpu label the lock leaves off (see below).
if [ -f requirements/lock.txt ]; then
  sed -E 's/^torch==([0-9.]+)$/torch==\1+cpu/' requirements/lock.txt >"$out"
fi
"$UV_VENV/bin/uv" pip compile pyproject.toml requirements/lock.in --constraint requirements/lock-constraints.in \
  --all-extras --python-version 3.11 --python-platform x86_64-manylinux_2_28 ${find_links[@]+"${find_links[@]}"} \
  --custom-compile-command "bash scripts/lock.sh" --quiet --output-file "$out" "$@"
if grep -q -E '^(nvidia-|triton==)' "$out" || ! grep -q -E '^torch==[0-9.]+\+cpu$' "$out"; then
  echo "lock: torch did not resolve to its CPU build (found: $(grep '^torch==' "$out")); point" \
    "PALORA_LOCK_FIND_LINKS at a folder holding the torch CPU wheel. requirements/lock.txt is unchanged." >&2
  exit 1
fi
# The lock names torch 2.13.0 without the +cpu label, so that PyPI's plain build satisfies it as well.
sed -i -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/' "$out"
cp "$out" requirements/lock.txt
echo "lock: requirements/lock.txt: $(grep -c -E '^[A-Za-z0-9]' requirements/lock.txt) packages; $(grep -E \
  '^(torch|transformers|peft|safetensors|kernels)==' requirements/lock.txt | tr '\n' ' ')" >&2

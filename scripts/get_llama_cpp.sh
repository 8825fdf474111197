#!/usr/bin/env bash
# Unpack llama.cpp's sources (with its converters convert_hf_to_gguf.py and convert_lora_to_gguf.py, which
# `pip install llama-cpp-python` does not install) under .llama.cpp/ (git-ignored), and print the folder to use as
# PALORA_LLAMA_CPP_DIR. The sources are the ones vendored in llama-cpp-python's source distribution, downloaded with
# pip, so the converters match the llama.cpp that llama-cpp-python runs:
#   export PALORA_LLAMA_CPP_DIR=$(bash scripts/get_llama_cpp.sh)          # version 0.3.36
#   export PALORA_LLAMA_CPP_DIR=$(bash scripts/get_llama_cpp.sh 0.3.37)   # another llama-cpp-python release
# Uses $PYTHON / the active venv / ./.venv for pip (scripts/_python.sh). Only the path goes to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-0.3.36}
DEST=$PWD/.llama.cpp
TREE=$DEST/llama_cpp_python-$VERSION/vendor/llama.cpp
if [ ! -f "$TREE/convert_lora_to_gguf.py" ]; then
  source scripts/_python.sh
  mkdir -p "$DEST"
  echo "get_llama_cpp: downloading the llama-cpp-python $VERSION source distribution ..." >&2
  "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DEST" >&2
  tar -xzf "$DEST/llama_cpp_python-$VERSION.tar.gz" -C "$DEST"
fi
for script in convert_hf_to_gguf.py convert_lora_to_gguf.py; do
  [ -f "$TREE/$script" ] || { echo "get_llama_cpp: $TREE/$script is missing" >&2; exit 1; }
done
echo "$TREE"

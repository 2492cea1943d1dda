#!/usr/bin/env bash
# Create .venv (once) and install mlxft with its test extras. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
stamp=.venv/.mlxft-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$PY" -m pip install --quiet --upgrade pip
  extra=()
  # Linux x86-64: pin the CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
  if [ "$(uname -s)" = "Linux" ] && [ "$(uname -m)" = "x86_64" ]; then
    extra+=("torch==2.13.0")
  fi
  # llama-cpp-python (a dev extra: the export tests' llama.cpp oracle) compiles llama.cpp from
  # source on its first install; pip keeps the built wheel in its cache, so later runs reuse it.
  # Its multimodal library is not needed, and all cores may compile.
  export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
  "$PY" -m pip install --quiet -e ".[dev]" "${extra[@]}"
  touch "$stamp"
fi

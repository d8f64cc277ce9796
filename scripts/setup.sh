#!/usr/bin/env bash
# Creates .venv in the repository root and installs asyncfl with its pinned dependencies.
# torch is pinned to 2.13.0 (the CPU wheel); the constraints file keeps any dependency
# from pulling a different (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.asyncfl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/constraints.txt -nt "$stamp" ]; then
  echo "[setup] installing asyncfl and its dependencies into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c scripts/constraints.txt -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import asyncfl, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  touch "$stamp"
fi

#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the whole test suite: lint, type check, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "[test] ruff"; .venv/bin/ruff check src tests bench
echo "[test] mypy"; .venv/bin/mypy
echo "[test] pytest"; .venv/bin/pytest -n 2 "$@"

#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the main job on its built-in default: the quick
# Papaya comparison (basic synchronous FL, synchronous FL with a deadline, FedBuff) on
# Shakespeare with the real phone population (synthetic devices, with a message, when
# ../shared/data is absent), printing its table. A few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/asyncfl experiment papaya --quick --out runs/papaya-quick "$@"

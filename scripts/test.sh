#!/usr/bin/env bash
# Set everything up and run the whole test suite (library + MRML logic).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest "$@"

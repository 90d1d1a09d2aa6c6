#!/usr/bin/env bash
# Set everything up and run the demo on the embedded sample data; open demo_output/index.html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/deepmmreg demo -o "${1:-demo_output}"

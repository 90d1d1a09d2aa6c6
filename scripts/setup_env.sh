#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the package into it.
# torch: an already-installed build is kept; otherwise TORCH_SPEC (default torch==2.13.0) is installed
# before the package, so pip never swaps a CPU build for a multi-GB CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "Python >= 3.10 is needed" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
if ! "$VPY" -c 'import torch' 2>/dev/null; then
  "$VPY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$VPY" -m pip install -q -e ".[test]"

#!/usr/bin/env bash
# Prints a Python interpreter that has numpy, for the bench scripts that
# rewrite safetensors files (safetensors_np.py, make_cross_encoder.py): the
# machine's python3 when it has numpy, otherwise a venv under ~/.cache/ragd
# with numpy from PyPI, created the first time (a new machine's python3
# has no numpy).
set -euo pipefail
if python3 -c "import numpy" 2>/dev/null; then
  command -v python3
  exit 0
fi
venv="${XDG_CACHE_HOME:-$HOME/.cache}/ragd/numpy-venv"
if ! "$venv/bin/python" -c "import numpy" 2>/dev/null; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet numpy >&2
fi
echo "$venv/bin/python"

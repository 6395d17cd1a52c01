#!/usr/bin/env bash
# Creates (once) the Python environment the interop tests use: torch + transformers.
# It lives outside the clone so CI reruns reuse it. Prints the venv path.
set -euo pipefail
VENV="${NANOMOE_VENV:-$HOME/.cache/nanomoe/venv-v1}"
STAMP="$VENV/.nanomoe-ready"
if [ ! -f "$STAMP" ]; then
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q --upgrade pip >&2
  "$VENV/bin/pip" install -q "torch==2.15.*" "transformers==5.*" "tokenizers" "safetensors" "numpy" "pytest" >&2
  touch "$STAMP"
fi
# Packages added after the environment was first made.
"$VENV/bin/python" -c "import pyarrow" 2>/dev/null || "$VENV/bin/pip" install -q pyarrow >&2
echo "$VENV"

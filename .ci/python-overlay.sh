#!/usr/bin/env bash
# Installs (once) another transformers version - with the tokenizers and huggingface_hub it
# needs - into a folder that goes first on PYTHONPATH, over the test venv's torch. Prints the
# folder. usage: python-overlay.sh VERSION
set -euo pipefail
VERSION="$1"
VENV="$(bash "$(dirname "$0")/python-env.sh")"
DIR="${NANOMOE_OVERLAY_ROOT:-$HOME/.cache/nanomoe}/overlay-tf-$VERSION"
if [ ! -f "$DIR/.nanomoe-ready" ]; then
  rm -rf "$DIR"
  "$VENV/bin/pip" install -q --target "$DIR" "transformers==$VERSION" >&2
  touch "$DIR/.nanomoe-ready"
fi
echo "$DIR"

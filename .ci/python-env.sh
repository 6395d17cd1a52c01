#!/usr/bin/env bash
# Creates (once) the Python environment the interop tests use: torch (CPU use only) +
# transformers. It lives outside the clone so CI reruns reuse it. Prints the venv path.
#
# PyPI's Linux torch wheel is a CUDA build: `import torch` links the CUDA libraries (nvidia-*,
# ~3 GB) even on a machine without a GPU, and PyPI has no CPU-only build. Triton (1 GB) is only
# for GPU kernels, so torch is installed without it: its other requirements, read from its own
# metadata, are installed explicitly.
set -euo pipefail
VENV="${NANOMOE_VENV:-$HOME/.cache/nanomoe/venv-v2}"
STAMP="$VENV/.nanomoe-ready"
if [ ! -f "$STAMP" ]; then
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q --upgrade pip >&2
  "$VENV/bin/pip" install -q --no-deps "torch==2.15.*" >&2
  "$VENV/bin/python" - > "$VENV/torch-requirements.txt" <<'PY'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
for r in map(Requirement, requires("torch")):
    if r.name != "triton" and (r.marker is None or r.marker.evaluate({"extra": ""})):
        print(r)
PY
  "$VENV/bin/pip" install -q -r "$VENV/torch-requirements.txt" >&2
  "$VENV/bin/pip" install -q "transformers==5.*" "tokenizers" "safetensors" "numpy" "pytest" "pyarrow" >&2
  "$VENV/bin/python" -c "import torch, transformers; torch.ones(2).sum()" >&2
  touch "$STAMP"
fi
# Added later: the serving tests drive the real openai client.
"$VENV/bin/python" -c "import openai" 2>/dev/null || "$VENV/bin/pip" install -q "openai==3.*" >&2
# Added later: the GGUF tests compare blocks with the `gguf` package and run llama.cpp's
# convert_hf_to_gguf.py, which also imports sentencepiece, yaml, requests and tqdm.
"$VENV/bin/python" -c "import gguf, sentencepiece, yaml, requests, tqdm" 2>/dev/null \
  || "$VENV/bin/pip" install -q "gguf==0.19.*" "sentencepiece" "pyyaml" "requests" "tqdm" >&2
echo "$VENV"

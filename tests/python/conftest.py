"""Shared helpers for the interop tests: they drive the `nanomoe` binary."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def nanomoe_bin() -> str:
    b = os.environ.get("NANOMOE_BIN") or str(ROOT / "target" / "debug" / "nanomoe")
    if not Path(b).is_file():
        pytest.fail(f"nanomoe binary not found at {b}: run `cargo build` or set NANOMOE_BIN")
    return b


def run(*args: str) -> str:
    p = subprocess.run([nanomoe_bin(), *map(str, args)], capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"nanomoe {' '.join(map(str, args))} failed: {p.stderr.strip()}")
    return p.stdout


def ids_arg(rows) -> str:
    return ";".join(",".join(str(int(x)) for x in r) for r in rows)


def rust_forward(model_dir, ids, labels=None, tmp=None):
    """Returns (logits tensor, json output) of `nanomoe forward`."""
    from safetensors.torch import load_file

    out = Path(tmp) / "logits.safetensors"
    args = ["forward", model_dir, "--ids", ids_arg(ids), "--out", out]
    if labels is not None:
        args += ["--labels", ids_arg(labels)]
    v = json.loads(run(*args))
    return load_file(str(out))["logits"], v


def rust_greedy(model_dir, prompt, n, repetition_penalty=1.0):
    v = json.loads(run("generate", model_dir, "--ids", ids_arg([prompt]), "--greedy", "--max-new-tokens", n,
                       "--repetition-penalty", repetition_penalty, "--json"))
    return v["ids"][0]

"""The seed's own model (askerlee/nanoMoE @ b2142af, imported unmodified from
../shared/reference as the oracle): directories its save_pretrained wrote load, run and
generate in nanomoe exactly; `nanomoe convert` makes them loadable by transformers without the
seed's model.py; wolfecameron/nanoMoE's stride-2 ckpt.pt converts exactly; a config key nanomoe
does not implement is refused by name."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ids_arg, run, rust_forward

HERE = Path(__file__).resolve().parent
REF = Path(os.environ.get("NANOMOE_REFERENCE", HERE.parents[2] / "shared" / "reference"))
SEED_PATH = os.environ.get("NANOMOE_SEED_PYTHONPATH")

pytestmark = [
    pytest.mark.skipif(not (REF / "nanomoe-seed-b2142af" / "model.py").is_file(),
                       reason=f"the upstream reference code is not at {REF} (../shared/reference): seed parity tests skipped"),
    pytest.mark.skipif(not SEED_PATH, reason="NANOMOE_SEED_PYTHONPATH (a transformers 4.51-4.57 for the seed's save_pretrained) "
                                             "is not set: run the tests through ./scripts/test"),
]

VOCAB = 97
BASE = {"n_layer": 4, "n_head": 2, "n_embd": 32, "vocab_size": VOCAB, "block_size": 48,
        "use_experts_ortho_loss": True, "use_gate_output_loss": True}
VARIANTS = {
    "dense-bias": {**BASE, "bias": True},
    "dense-nobias": {**BASE, "bias": False},
    "moe-relu2-bias-stride2": {**BASE, "n_exp": 4, "moe_top_k": 2, "stride": 2, "bias": True},
    "moe-swiglu-nobias": {**BASE, "n_exp": 4, "moe_top_k": 2, "stride": 1, "bias": False, "use_qwen3_moe_mlp": True},
    "moe-swiglu-bias-start2": {**BASE, "n_exp": 4, "moe_top_k": 2, "stride": 1, "moe_start_layer": 2, "bias": True,
                               "use_qwen3_moe_mlp": True},
    "moe-drops-top1": {**BASE, "n_exp": 4, "moe_top_k": 1, "stride": 1, "eval_capacity": 0.5, "min_capacity": 1,
                       "use_qwen3_moe_mlp": True, "moe_start_layer": 1},
}
IDS = [[(7 * i + 3) % VOCAB for i in range(20)], [(13 * i + 5) % VOCAB for i in range(20)]]
PROMPT = [5, 17, 33, 2, 60, 41]


def seed_ref(*args):
    env = {**os.environ, "PYTHONPATH": SEED_PATH, "NANOMOE_REFERENCE": str(REF)}
    p = subprocess.run([sys.executable, str(HERE / "seed_ref.py"), *map(str, args)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, f"seed_ref.py {args[0]} failed:\n{p.stderr[-3000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def make_seed_dir(tmp_path, name, cfg, seed=1):
    d = tmp_path / f"seed-{name}"
    seed_ref("make", d, json.dumps(cfg), seed)
    return d


def seed_logits(d, ids, tmp_path):
    out = tmp_path / "seed-logits.safetensors"
    seed_ref("logits", d, json.dumps(ids), out)
    return load_file(str(out))["logits"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_seed_directory_runs_exactly_in_nanomoe(tmp_path, name):
    cfg = VARIANTS[name]
    d = make_seed_dir(tmp_path, name, cfg)
    theirs = seed_logits(d, IDS, tmp_path)
    ours, _ = rust_forward(d, IDS, tmp=tmp_path)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    # Greedy decoding: with the KV cache where no token can be dropped, by re-running the whole
    # sequence (as the seed does) where capacity drops tokens.
    want = seed_ref("greedy", d, json.dumps(PROMPT), 12)["ids"][len(PROMPT):]
    extra = ["--no-cache"] if "drops" in name else []
    got = json.loads(run("generate", d, "--ids", ids_arg([PROMPT]), "--greedy", "--max-new-tokens", 12, "--json", *extra))["ids"][0]
    assert got == want
    # No end of text: the seed's directory defines none, so all 12 tokens come.
    assert len(got) == 12


def test_converted_seed_directory_loads_in_transformers_without_the_seed_code(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = {**VARIANTS["moe-swiglu-bias-start2"], "pad_token_id": 3}
    d = make_seed_dir(tmp_path, "convert", cfg, seed=4)
    theirs = seed_logits(d, IDS, tmp_path)
    out = tmp_path / "converted"
    run("convert", d, "--out", out)
    c = json.loads((out / "config.json").read_text())
    assert c["auto_map"]["AutoModelForCausalLM"] == "modeling_nanomoe_gpt.GPT"
    assert (c["norm_type"], c["qk_norm"], c["activation_function"], c["expert_mlp"], c["moe_start_layer"]) == \
        ("rmsnorm", True, "relu2", "swiglu", 2)
    assert c["pad_token_id"] == 3  # a key that does not change the math survives
    assert "eos_token_id" not in c and "top_k" not in c
    m, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        py = m.eval()(torch.tensor(IDS)).logits
    assert (py - theirs).abs().max().item() <= 1e-4
    ours, _ = rust_forward(out, IDS, tmp=tmp_path)
    assert (ours - theirs).abs().max().item() <= 1e-4
    # HF generate through the remote code's KV cache gives the seed's greedy tokens.
    want = seed_ref("greedy", d, json.dumps(PROMPT), 10)["ids"]
    with torch.no_grad():
        hf = m.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert hf[0].tolist() == want


def test_seed_config_with_an_unsupported_key_is_refused_by_name(tmp_path):
    d = make_seed_dir(tmp_path, "unsupported", VARIANTS["moe-swiglu-nobias"])
    c = json.loads((d / "config.json").read_text())
    c["rope_theta"] = 10000.0
    (d / "config.json").write_text(json.dumps(c))
    p = subprocess.run([os.environ.get("NANOMOE_BIN", "nanomoe"), "info", str(d)], capture_output=True, text=True)
    assert p.returncode != 0
    assert ("unknown config key \"rope_theta\": nanomoe does not implement it and it may change the model's computation"
            in p.stderr), p.stderr


def test_wolfecameron_stride2_checkpoint_converts_exactly(tmp_path):
    # wolfecameron/nanoMoE's defaults: stride 2, MoE blocks at i % stride == 0 (0 and 2 here).
    args = {"n_layer": 4, "n_head": 2, "n_embd": 32, "block_size": 48, "vocab_size": VOCAB, "bias": False,
            "dropout": 0.0, "n_exp": 4, "top_k": 2, "stride": 2, "use_aux_loss": True, "use_router_z_loss": True}
    ckpt, want = tmp_path / "ckpt.pt", tmp_path / "wolfe-logits.safetensors"
    seed_ref("wolfe", ckpt, json.dumps(args), 2, json.dumps(IDS), want)
    out = tmp_path / "from-ckpt"
    run("convert", ckpt, "--out", out)
    c = json.loads((out / "config.json").read_text())
    assert c["moe_placement"] == "start" and c["norm_type"] == "layernorm" and c["activation_function"] == "gelu"
    ours, _ = rust_forward(out, IDS, tmp=tmp_path)
    assert (ours - load_file(str(want))["logits"]).abs().max().item() <= 1e-4

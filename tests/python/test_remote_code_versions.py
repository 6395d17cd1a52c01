"""The remote code written next to every nanomoe_gpt model implements every architecture
variant, on whichever transformers runs the tests (./scripts/test runs this file on 5.x and on
4.46): Rust-saved directories load with trust_remote_code, give Rust's logits, and HF
generate (through the KV cache) gives nanomoe's greedy tokens."""
import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from conftest import ids_arg, run, rust_forward

SEED_ARCH = {"norm_type": "rmsnorm", "layer_norm_epsilon": 1e-6, "qk_norm": True, "activation_function": "relu2",
             "moe_placement": "end"}
BASE = {"n_layer": 4, "n_head": 2, "n_embd": 32, "vocab_size": 71, "block_size": 40}
CONFIGS = {
    "seed-dense": {**BASE, **SEED_ARCH, "expert_mlp": "mlp", "bias": True},
    "seed-moe-swiglu-start1": {**BASE, **SEED_ARCH, "expert_mlp": "swiglu", "n_exp": 4, "moe_top_k": 2,
                               "moe_start_layer": 1, "bias": False},
    "seed-moe-relu2-bias": {**BASE, **SEED_ARCH, "expert_mlp": "mlp", "n_exp": 4, "moe_top_k": 2, "stride": 2,
                            "bias": True},
    "gpt2-moe-placement-start": {**BASE, "n_exp": 4, "moe_top_k": 1, "stride": 2, "moe_placement": "start",
                                 "activation_function": "gelu", "norm_type": "layernorm", "layer_norm_epsilon": 1e-5,
                                 "qk_norm": False, "expert_mlp": "mlp"},
}
IDS = [[(5 * i + 1) % 71 for i in range(16)], [(11 * i + 7) % 71 for i in range(16)]]
PROMPT = [3, 9, 27, 10]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_remote_code_matches_rust(tmp_path, name):
    d = tmp_path / name
    run("new", "--config", json.dumps(CONFIGS[name]), "--out", d, "--seed", "5")
    m, info = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], (transformers.__version__, info)
    m.eval()
    with torch.no_grad():
        py = m(torch.tensor(IDS)).logits
    ours, _ = rust_forward(d, IDS, tmp=tmp_path)
    assert (ours - py).abs().max().item() <= 1e-4, transformers.__version__
    want = json.loads(run("generate", d, "--ids", ids_arg([PROMPT]), "--greedy", "--max-new-tokens", 12, "--json"))["ids"][0]
    with torch.no_grad():
        got = m.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert got[0].tolist()[len(PROMPT):] == want, transformers.__version__

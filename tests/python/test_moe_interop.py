"""MoE models: Rust-saved nanomoe_gpt directories load in transformers with trust_remote_code
and give Rust's numbers; Python-trained ones load back in Rust."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ids_arg, run, rust_forward

BASE = {"n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": 89, "block_size": 64,
        "use_aux_loss": True, "use_router_z_loss": True}
CONFIGS = {
    "stride1-top2-bias": {**BASE, "n_exp": 4, "moe_top_k": 2, "stride": 1},
    "stride2-top1-nobias": {**BASE, "n_layer": 4, "n_exp": 8, "moe_top_k": 1, "stride": 2, "bias": False,
                            "activation_function": "gelu"},
    "drops": {**BASE, "n_exp": 4, "moe_top_k": 2, "stride": 1, "eval_capacity": 0.5, "min_capacity": 1},
    "switch-noisy": {**BASE, "n_exp": 4, "moe_top_k": 2, "stride": 2, "n_layer": 2, "use_switch_tfm_init": True,
                     "use_noisy_top_k": True, "router_use_full_prec": True},
}
VOCAB = BASE["vocab_size"]
IDS = [[(7 * i + 3) % VOCAB for i in range(24)], [(13 * i + 5) % VOCAB for i in range(24)]]
LABELS = [r[:] for r in IDS]
LABELS[1][6] = -100


def load_py(d):
    m, info = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return m.eval()


def rust_generate(d, prompt, n, *extra):
    v = json.loads(run("generate", d, "--ids", ids_arg([prompt]), "--greedy", "--max-new-tokens", n,
                       "--repetition-penalty", "1.5", "--json", *extra))
    return v["ids"][0]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rust_saved_moe_loads_in_transformers(tmp_path, name):
    d = tmp_path / name
    run("new", "--config", json.dumps(CONFIGS[name]), "--out", d, "--seed", "3")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_nanomoe_gpt.GPT"
    assert "top_k" not in cfg
    m = load_py(d)
    with torch.no_grad():
        out = m(torch.tensor(IDS), labels=torch.tensor(LABELS))
    rl, v = rust_forward(d, IDS, LABELS, tmp_path)
    assert (rl - out.logits).abs().max().item() <= 1e-4
    assert abs(v["loss"] - out.loss.item()) <= 1e-5
    # The seed's legacy call: targets pre-shifted, -1 ignored (the same tokens, so the same routing).
    lab = torch.tensor(LABELS)
    targets = torch.cat([lab[:, 1:], torch.full((2, 1), -1)], dim=1).masked_fill(
        torch.cat([lab[:, 1:], torch.zeros(2, 1, dtype=torch.long)], dim=1) == -100, -1)
    with torch.no_grad():
        logits, loss, losses = m(idx=torch.tensor(IDS), targets=targets, return_dict=False)
    assert abs(losses["ntp_loss"].item() - v["losses"]["ntp_loss"]) <= 1e-5
    assert abs(losses["aux_loss"].item() - v["losses"]["aux_loss"]) <= 1e-5
    assert abs(losses["router_z_loss"].item() - v["losses"]["router_z_loss"]) <= 1e-5
    assert abs(loss.item() - v["loss"]) <= 1e-5
    prompt = IDS[0][:5]
    with torch.no_grad():
        cached = m.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                            repetition_penalty=1.5)[0, 5:].tolist()
        uncached = m.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                              repetition_penalty=1.5, use_cache=False)[0, 5:].tolist()
    assert rust_generate(d, prompt, 32) == cached
    assert rust_generate(d, prompt, 32, "--no-cache") == uncached
    if name != "drops":
        # Without capacity drops routing is per token, so the cache changes nothing. (With
        # drops, capacity depends on how many tokens a forward sees, in both implementations.)
        assert cached == uncached


def test_python_trained_moe_loads_in_rust(tmp_path):
    d = tmp_path / "rust"
    run("new", "--config", json.dumps(CONFIGS["stride1-top2-bias"]), "--out", d, "--seed", "1")
    m = load_py(d)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = torch.tensor(IDS)
    first = None
    for _ in range(5):
        out = m(x, labels=x)
        first = first if first is not None else out.loss.item()
        out.loss.backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        opt.zero_grad()
    assert out.loss.item() < first
    m.eval()
    d2 = tmp_path / "py"
    m.save_pretrained(d2)
    with torch.no_grad():
        logits = m(x).logits
    rl, _ = rust_forward(d2, IDS, None, tmp_path)
    assert (rl - logits).abs().max().item() <= 1e-4


def test_directories_nanomoe_wrote_before_the_seed_architecture_load_in_both(tmp_path):
    """nanomoe's configs before the seed's architecture carried activation_function and
    layer_norm_epsilon and none of the architecture keys written now (older ones the legacy
    top_k): they still load as GPT-2 blocks, in Rust and in the remote code."""
    d = tmp_path / "old"
    conf = {**CONFIGS["stride2-top1-nobias"], "activation_function": "gelu", "moe_top_k": 2}
    run("new", "--config", json.dumps(conf), "--out", d, "--seed", "4")
    before, _ = rust_forward(d, IDS, None, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["top_k"] = cfg.pop("moe_top_k")
    for k in ("norm_type", "qk_norm", "expert_mlp", "moe_placement", "moe_start_layer", "use_qwen3_moe_mlp",
              "use_router_ortho_loss", "router_ortho_loss_weight", "router_ortho_neg_corr_weight",
              "use_experts_ortho_loss", "experts_ortho_loss_weight", "use_gate_output_loss", "gate_output_loss_weight"):
        del cfg[k]
    (d / "config.json").write_text(json.dumps(cfg))
    after, _ = rust_forward(d, IDS, None, tmp_path)
    assert (after - before).abs().max().item() == 0.0
    m = load_py(d)
    assert m.config.moe_top_k == 2 and m.config.activation_function == "gelu" and m.config.norm_type == "layernorm"
    with torch.no_grad():
        logits = m(torch.tensor(IDS)).logits
    assert (logits - before).abs().max().item() <= 1e-4


def test_generate_past_block_size_crops_like_nanomoe(tmp_path):
    """Past block_size tokens, transformers' generate crops the context to its last block_size
    tokens (nanoGPT's rule), with and without the cache, and gives `nanomoe generate`'s tokens."""
    d = tmp_path / "short"
    run("new", "--config", json.dumps({**CONFIGS["stride1-top2-bias"], "block_size": 16}), "--out", d, "--seed", "5")
    m = load_py(d)
    prompt = IDS[0][:5]
    with torch.no_grad():
        cached = m.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                            repetition_penalty=1.5)[0, 5:].tolist()
        uncached = m.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                              repetition_penalty=1.5, use_cache=False)[0, 5:].tolist()
    assert len(cached) == 30
    assert rust_generate(d, prompt, 30) == cached
    assert rust_generate(d, prompt, 30, "--no-cache") == uncached == cached


def test_remote_code_trains_under_bf16_autocast(tmp_path):
    """nanoGPT's dtype='bfloat16' runs the forward under torch.autocast: the experts' products
    come back in bf16 and are combined into the f32 output (this raised before)."""
    d = tmp_path / "m"
    run("new", "--config", json.dumps(CONFIGS["stride2-top1-nobias"]), "--out", d, "--seed", "3")
    m = load_py(d).train()
    ids, lab = torch.tensor(IDS), torch.tensor(LABELS)
    full = m(ids, labels=lab).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids, labels=lab)
    out.loss.backward()
    assert abs(out.loss.item() - full) <= 0.05 * abs(full), (out.loss.item(), full)
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

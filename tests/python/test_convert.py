"""`nanomoe convert`: nanoGPT / nanoMoE ckpt.pt files written by PyTorch convert and give
the same logits; pickles with anything but tensors and plain values are refused."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT, nanomoe_bin, run, rust_forward

sys.path.insert(0, str(ROOT / "python" / "nanomoe_hf"))


# ---- a small nanoGPT-style model, written for this test (same module names as nanoGPT) ----
class LayerNorm(nn.Module):
    def __init__(self, n, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Attention(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.c_attn = nn.Linear(a["n_embd"], 3 * a["n_embd"], bias=a["bias"])
        self.c_proj = nn.Linear(a["n_embd"], a["n_embd"], bias=a["bias"])
        self.n_head = a["n_head"]
        T = a["block_size"]
        # the causal-mask buffer nanoGPT keeps when flash attention is unavailable
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf")).softmax(-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.c_fc = nn.Linear(a["n_embd"], 4 * a["n_embd"], bias=a["bias"])
        self.c_proj = nn.Linear(4 * a["n_embd"], a["n_embd"], bias=a["bias"])

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(a["n_embd"], a["bias"]), Attention(a)
        self.ln_2, self.mlp = LayerNorm(a["n_embd"], a["bias"]), MLP(a)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(a["vocab_size"], a["n_embd"]), wpe=nn.Embedding(a["block_size"], a["n_embd"]),
            h=nn.ModuleList([Block(a) for _ in range(a["n_layer"])]), ln_f=LayerNorm(a["n_embd"], a["bias"])))
        self.lm_head = nn.Linear(a["n_embd"], a["vocab_size"], bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        with torch.no_grad():
            for p in self.parameters():
                p.add_(torch.randn_like(p) * 0.1)

    def forward(self, idx):
        pos = torch.arange(idx.size(1))
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for b in self.transformer.h:
            x = b(x)
        return self.lm_head(self.transformer.ln_f(x))


IDS = [[3, 14, 15, 9, 2, 6, 5, 35, 8, 9, 7, 9], [1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 8, 0]]


def save_ckpt(path, model, args, compiled=True):
    sd = model.state_dict()
    if compiled:
        sd = {"_orig_mod." + k: v for k, v in sd.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.save({"model": sd, "optimizer": opt.state_dict(), "model_args": args, "iter_num": 5,
                "best_val_loss": torch.tensor(1.5), "config": {"learning_rate": 6e-4, "dataset": "x"}}, path)


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_ckpt_converts_with_equal_logits(tmp_path, bias):
    torch.manual_seed(1)
    args = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, bias=bias, vocab_size=60, dropout=0.0)
    m = NanoGPT(args).eval()
    save_ckpt(tmp_path / "ckpt.pt", m, args)
    out = tmp_path / "hf"
    run("convert", tmp_path / "ckpt.pt", "--out", out)
    with torch.no_grad():
        logits = m(torch.tensor(IDS))
    rl, _ = rust_forward(out, IDS, None, tmp_path)
    assert (rl - logits).abs().max().item() <= 1e-4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["activation_function"] == "gelu"


def test_nanomoe_ckpt_converts_with_equal_logits(tmp_path):
    from configuration_nanomoe_gpt import GPTConfig
    from modeling_nanomoe_gpt import GPT

    torch.manual_seed(2)
    args = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, bias=False, vocab_size=60, dropout=0.0,
                n_exp=4, top_k=2, stride=2, use_aux_loss=True, use_router_z_loss=True, use_noisy_top_k=False,
                aux_loss_weight=0.01, router_z_loss_weight=0.001, train_capacity=1.25, eval_capacity=2.0,
                min_capacity=4, use_switch_tfm_init=True, switch_tfm_init_scale=1.0, router_use_full_prec=True)
    m = GPT(GPTConfig(activation_function="gelu", **args)).eval()
    sd = {k: v for k, v in m.state_dict().items()}
    torch.save({"model": {"_orig_mod." + k: v for k, v in sd.items()}, "model_args": args, "iter_num": 1}, tmp_path / "ckpt.pt")
    out = tmp_path / "hf"
    run("convert", tmp_path / "ckpt.pt", "--out", out)
    with torch.no_grad():
        logits = m(torch.tensor(IDS)).logits
    rl, _ = rust_forward(out, IDS, None, tmp_path)
    assert (rl - logits).abs().max().item() <= 1e-4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nanomoe_gpt" and cfg["moe_top_k"] == 2 and "top_k" not in cfg


class Custom:
    def __init__(self):
        self.x = 1


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def refused(path):
    import subprocess
    p = subprocess.run([nanomoe_bin(), "convert", str(path), "--out", str(path) + ".hf"], capture_output=True, text=True)
    assert p.returncode != 0
    assert not os.path.exists(str(path) + ".hf")
    return p.stderr.strip()


def test_pickles_with_objects_or_code_are_refused(tmp_path):
    args = dict(n_layer=1, n_head=2, n_embd=8, block_size=8, bias=True, vocab_size=10, dropout=0.0)
    m = NanoGPT(args)
    torch.save({"model": m.state_dict(), "model_args": args, "extra": Custom()}, tmp_path / "custom.pt")
    err = refused(tmp_path / "custom.pt")
    assert err == (f"error: {tmp_path / 'custom.pt'}: refusing to load: the pickle references "
                   f"test_convert.Custom, which is neither a tensor nor a plain value")
    marker = tmp_path / "pwned"
    torch.save({"model": m.state_dict(), "model_args": args, "x": Evil(marker)}, tmp_path / "evil.pt")
    err = refused(tmp_path / "evil.pt")
    assert "refusing to load: the pickle references posix.system" in err
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a zip at all")
    assert refused(tmp_path / "junk.pt").startswith(f"error: {tmp_path / 'junk.pt'}: not a PyTorch checkpoint")


def test_hf_directory_converts_to_bf16(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=60, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                   bos_token_id=59, eos_token_id=59)).eval()
    m.save_pretrained(tmp_path / "hf")
    run("convert", tmp_path / "hf", "--out", tmp_path / "bf16", "--dtype", "bf16")
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    ref = m.to(torch.bfloat16).float()
    with torch.no_grad():
        a = back(torch.tensor(IDS)).logits
        b = ref(torch.tensor(IDS)).logits
    assert (a - b).abs().max().item() <= 1e-4

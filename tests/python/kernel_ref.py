"""PyTorch references for nanomoe's fused CPU kernels (driven by tests/kernel_parity.rs).

usage: kernel_ref.py CASES_JSON INPUTS_SAFETENSORS OUT_SAFETENSORS
CASES_JSON: [{"name": .., "kind": .., "inputs": [input names], ...kind's parameters}, ...]
Inputs are "<name>.<input>" tensors plus "<name>.gy", the gradient flowing into the output.
Writes "<name>.y" (the output) and "<name>.d<input>" (each input's gradient) in float32.
"""
import json
import math
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


def attention(qkv, n_head, pad):
    b, t, c3 = qkv.shape
    c = c3 // 3
    q, k, v = (z.reshape(b, t, n_head, c // n_head).transpose(1, 2) for z in qkv.split(c, dim=2))
    scores = q @ k.transpose(-1, -2) / math.sqrt(c // n_head)
    i = torch.arange(t).view(t, 1)
    j = torch.arange(t).view(1, t)
    allowed = torch.stack([(j <= i) & (j >= p) for p in pad]).unsqueeze(1)  # [B, 1, T, T]
    # Rows of padding see nothing; a finite fill keeps them finite (their gradient is zero).
    att = torch.softmax(scores.masked_fill(~allowed, -1e30), dim=-1)
    return (att @ v).transpose(1, 2).reshape(b, t, c)


def bf16(t):
    """t rounded to bf16 (nearest, ties to even), in its own dtype."""
    return t.to(torch.bfloat16).to(t.dtype)


class Bf16Matmul(torch.autograd.Function):
    """a @ b, and both backward products, on operands rounded to bf16 with exact sums: the
    mixed-precision training products (nanomoe's --dtype bfloat16)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return bf16(a) @ bf16(b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g = bf16(g)
        return g @ bf16(b).transpose(-1, -2), bf16(a).transpose(-1, -2) @ g


def run(case, t):
    kind = case["kind"]
    mm = Bf16Matmul.apply if case.get("bf16") else torch.matmul
    if kind == "layer_norm":
        return F.layer_norm(t["x"], t["x"].shape[-1:], t["w"], t["b"], case["eps"])
    if kind == "rms_norm":
        return F.rms_norm(t["x"], t["x"].shape[-1:], t["w"], case["eps"])
    if kind == "qk_norm":  # the seed's QK-norm: no weight, torch's default eps for float32
        qkv, h = t["qkv"], case["n_head"]
        c = qkv.shape[-1] // 3
        q, k, v = qkv.split(c, dim=-1)
        eps = torch.finfo(torch.float32).eps
        norm = lambda z: F.rms_norm(z.reshape(*z.shape[:-1], h, c // h), (c // h,), eps=eps).reshape(z.shape)
        return torch.cat([norm(q), norm(k), v], dim=-1)
    if kind == "relu2":
        return F.relu(t["x"]) ** 2
    if kind == "swiglu":
        return F.silu(t["g"]) * t["u"]
    if kind == "gelu_tanh":
        return F.gelu(t["x"], approximate="tanh")
    if kind == "gelu_erf":
        return F.gelu(t["x"])
    if kind == "attention":
        return attention(t["qkv"], case["n_head"], case["pad"])
    if kind == "cross_entropy":
        return F.cross_entropy(t["logits"], t["targets"], ignore_index=-1)
    if kind == "linear_cross_entropy":
        return F.cross_entropy(mm(t["h"], t["w"].T), t["targets"], ignore_index=-1)
    if kind == "bias":
        return t["x"] + t["b"]
    if kind == "expert_matmul":
        return mm(t["x"], t["w"])
    if kind == "gate_loss_tap":  # the seed's two products: plain, and through GradientScaler(0.1)
        x, w = t["x"], t["w"]
        scaled = x * 0.1 + (x * 0.9).detach()
        return torch.cat([torch.bmm(x, w), torch.bmm(scaled, w)], dim=0)
    if kind == "swiglu_experts":  # the seed's experts (use_qwen3_moe_mlp) and its gate-output loss
        x, wg, wu = t["x"], t["wg"], t["wu"]
        h = F.silu(torch.bmm(x, wg)) * torch.bmm(x, wu)
        g = torch.bmm(x * 0.1 + (x * 0.9).detach(), wg)  # GradientScaler(0.1) on x
        rows = (g ** 2).mean(dim=-1)
        kept = rows > 0
        loss = rows[kept].sum() / kept.sum()
        return torch.cat([h.flatten(), loss.reshape(1)])
    if kind == "linear":
        return mm(t["x"], t["w"].T)
    if kind == "linear_nk":
        return t["x"] @ t["w"].T
    if kind == "matmul_kn":
        return t["x"] @ t["w"]
    raise SystemExit("unknown kernel kind %r" % kind)


def main(cases_json, inputs_path, out_path):
    cases = json.loads(open(cases_json).read())
    data = load_file(inputs_path)
    out = {}
    for case in cases:
        name = case["name"]
        t = {}
        for inp in case["inputs"]:
            v = data["%s.%s" % (name, inp)]
            if v.is_floating_point():
                v = v.double().requires_grad_(True)  # float64 reference
            t[inp] = v
        y = run(case, t)
        (y * data[name + ".gy"].double()).sum().backward()
        out[name + ".y"] = y.detach().float().contiguous()
        for inp, v in t.items():
            if v.is_floating_point():
                out["%s.d%s" % (name, inp)] = v.grad.float().contiguous()
    save_file(out, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The reference side of bench.py: PyTorch with transformers' GPT2LMHeadModel (dense) or
nanomoe's own modeling_nanomoe_gpt.py (MoE), on the weights nanomoe wrote - or, with
--seed-code, the seed's own model.py (askerlee/nanoMoE, imported unmodified from
../shared/reference; run it with a transformers 4.51-4.57 on PYTHONPATH). Prints one JSON
line shaped like `nanomoe bench`'s."""
import contextlib
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python" / "nanomoe_hf"))


def report(case, times, tokens):
    s = sorted(times)
    med = s[len(s) // 2]
    print(json.dumps({"case": case, "times_s": times, "median_s": med, "min_s": s[0], "max_s": s[-1],
                      "tokens_per_sec": tokens / med}))


SEED_CODE = False


def load(model):
    if SEED_CODE:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
        from seed_ref import load as load_reference
        return load_reference("nanomoe-seed-b2142af").GPT.from_pretrained(model)
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model, trust_remote_code=True, dtype=torch.float32)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["train", "decode", "prefill", "moe-layer"])
    p.add_argument("--model")
    p.add_argument("--inputs")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--seed-code", action="store_true", help="the seed's own model.py as the reference")
    p.add_argument("--compile", action="store_true",
                   help="train: the model through torch.compile (inductor, CPU), as nanoGPT's compile=True does")
    p.add_argument("--autocast-bf16", action="store_true",
                   help="train: forward under torch.autocast('cpu', dtype=torch.bfloat16), as nanoGPT's dtype='bfloat16' "
                        "(f32 weights and optimizer; bf16 products)")
    a = p.parse_args()
    global SEED_CODE
    SEED_CODE = a.seed_code
    if a.kind == "train":
        from safetensors.torch import load_file
        m = load(a.model).train()
        # nanoGPT's `model = torch.compile(model)`: the first (warm-up) steps compile.
        fwd = torch.compile(m) if a.compile else m
        t = load_file(a.inputs)
        x, y = t["x"], t["y"]
        named = list(m.named_parameters())
        decay = [q for n, q in named if q.dim() >= 2 and not n.endswith("bias")]
        other = [q for n, q in named if not (q.dim() >= 2 and not n.endswith("bias"))]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                lr=1e-4, betas=(0.9, 0.95))
        times = []
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.autocast_bf16 else contextlib.nullcontext
        for s in range(x.shape[0]):
            t0 = time.perf_counter()
            with ctx():
                if m.config.model_type == "gpt2":
                    logits = fwd(input_ids=x[s]).logits
                    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[s].reshape(-1), ignore_index=-1)
                else:
                    _, loss, _ = fwd(idx=x[s], targets=y[s], return_dict=False)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if s >= a.warmup:
                times.append(time.perf_counter() - t0)
        report("train", times, x.shape[1] * x.shape[2])
    elif a.kind == "decode":
        m = load(a.model).eval()
        ids = torch.zeros((1, 1), dtype=torch.long)
        if SEED_CODE:
            # The seed's HF generate raises on transformers 4.57 (its config has no
            # num_hidden_layers); its sample.py decodes with generate_legacy (no KV cache).
            gen = lambda n: m.generate_legacy(ids, n, temperature=1.0, top_k=1)
        else:
            gen = lambda n: m.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        with torch.no_grad():
            gen(4)
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                gen(a.new_tokens)
                times.append(time.perf_counter() - t0)
        report("decode", times, a.new_tokens)
    elif a.kind == "prefill":
        m = load(a.model).eval()
        x = (torch.arange(a.tokens) * 7919 % m.config.vocab_size).unsqueeze(0)
        # Logits of the last position only, as a prompt before generation (and nanomoe's
        # bench prefill) needs them.
        with torch.no_grad():
            m(x, logits_to_keep=1)
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                m(x, logits_to_keep=1)
                times.append(time.perf_counter() - t0)
        report("prefill", times, a.tokens)
    else:
        from configuration_nanomoe_gpt import GPTConfig
        from modeling_nanomoe_gpt import MOELayer
        cfg = GPTConfig(n_layer=1, n_head=1, n_embd=a.n_embd, vocab_size=8, block_size=8, n_exp=a.experts,
                        moe_top_k=a.top_k, use_aux_loss=True)
        layer = MOELayer(cfg).train()
        with torch.no_grad():
            for q in layer.parameters():
                q.normal_(0, 0.02)
        x = torch.randn(1, a.tokens, a.n_embd)
        times = []
        for i in range(a.repeats + 1):
            t0 = time.perf_counter()
            y, aux, z, _, _ = layer(x)
            (y.pow(2).mean() + aux).backward()
            if i > 0:
                times.append(time.perf_counter() - t0)
        report("moe-layer-%d" % a.experts, times, a.tokens)


if __name__ == "__main__":
    main()

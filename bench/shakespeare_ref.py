"""The reference side of the tiny-shakespeare benchmark: nanoGPT's training loop and CPU
recipe in PyTorch, on the same prepared data (`nanomoe prepare --tokenizer char`), with the
model from nanomoe's remote code (nanoGPT's architecture and init; n_exp > 1 for MoE).

usage: python bench/shakespeare_ref.py --data DATA_DIR [--seed 1337] [--n-exp 1 ...]
Prints one JSON line: best in-run val estimate (eval_iters batches, as nanoGPT reports),
the best checkpoint's val loss over --final-iters batches, wall time and tokens/s.
"""
import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python" / "nanomoe_hf"))
from configuration_nanomoe_gpt import GPTConfig  # noqa: E402
from modeling_nanomoe_gpt import GPT  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--max-iters", type=int, default=2000)
    ap.add_argument("--eval-interval", type=int, default=250)
    ap.add_argument("--eval-iters", type=int, default=20)
    ap.add_argument("--final-iters", type=int, default=200)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-exp", type=int, default=1)
    ap.add_argument("--top-k", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(a.seed)
    meta = json.loads((Path(a.data) / "meta.json").read_text())
    dtype = np.uint16 if meta.get("dtype", "uint16") == "uint16" else np.uint32
    data = {s: np.memmap(Path(a.data) / ("%s.bin" % s), dtype=dtype, mode="r") for s in ("train", "val")}
    batch_size, block_size = 12, 64
    lr, min_lr, warmup, decay_iters = 1e-3, 1e-4, 100, a.max_iters
    moe = dict(n_exp=a.n_exp, moe_top_k=a.top_k, stride=2, use_aux_loss=True, use_router_z_loss=True) if a.n_exp > 1 else {}
    cfg = GPTConfig(vocab_size=meta["vocab_size"], block_size=block_size, n_layer=4, n_head=4, n_embd=a.n_embd,
                    dropout=0.0, bias=False, activation_function="gelu", **moe)
    model = GPT(cfg)
    model.train()

    def get_batch(split):
        d = data[split]
        ix = torch.randint(len(d) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(d[i:i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(d[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
        return x, y

    def get_lr(it):  # nanoGPT: linear warmup, cosine decay to min_lr
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > decay_iters:
            return min_lr
        ratio = (it - warmup) / (decay_iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))

    def loss_of(x, y):
        _, loss, _ = model(idx=x, targets=y, return_dict=False)
        return loss

    @torch.no_grad()
    def estimate(split, iters):
        model.eval()
        losses = torch.zeros(iters)
        for k in range(iters):
            x, y = get_batch(split)
            _, _, parts = model(idx=x, targets=y, return_dict=False)
            losses[k] = parts["ntp_loss"]  # the cross-entropy alone (no aux / z terms)
        model.train()
        return losses.mean().item()

    best, best_state, history = float("inf"), None, []
    start = time.time()
    for it in range(a.max_iters + 1):
        for g in opt.param_groups:
            g["lr"] = get_lr(it)
        if it % a.eval_interval == 0:
            v = estimate("val", a.eval_iters)
            history.append([it, v])
            if v < best:
                best, best_state = v, copy.deepcopy(model.state_dict())
        if it == a.max_iters:
            break
        x, y = get_batch("train")
        loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    wall = time.time() - start
    model.load_state_dict(best_state)
    torch.manual_seed(0)
    final = estimate("val", a.final_iters)
    print(json.dumps({"seed": a.seed, "best_in_run_val": best, "best_val_%d_batches" % a.final_iters: final,
                      "history": history, "wall_s": wall,
                      "tokens_per_sec": a.max_iters * batch_size * block_size / wall,
                      "params": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()

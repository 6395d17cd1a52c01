"""The upstream Python code as the oracle: askerlee/nanoMoE (the seed, b2142af) and
wolfecameron/nanoMoE, imported unmodified from ../shared/reference.

Run with a transformers the seed's save_pretrained works with (4.51-4.57; ./scripts/test
passes one through NANOMOE_SEED_PYTHONPATH). Commands (the last stdout line is JSON):
  make DIR CONFIG_JSON SEED          a seed GPT with perturbed weights, save_pretrained(DIR)
  logits DIR IDS_JSON OUT            its logits for IDS (eval mode) into OUT (safetensors)
  greedy DIR PROMPT_JSON N           N greedy tokens, the whole sequence re-run each step
  grads DIR BATCH_JSON OUT           the gradients of one [inputs, targets] batch's loss, in float64
                                     ("f64/NAME") and float32 ("f32/NAME"), into OUT (safetensors)
  train DIR RUN_JSON OUT_DIR         AdamW steps as the seed's train.py takes them (in float64
                                     when RUN_JSON has "float64": true; saved as float32)
  wolfe CKPT CONFIG_JSON SEED IDS_JSON OUT   a wolfecameron ckpt.pt and its logits for IDS
"""
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

REF = Path(os.environ.get("NANOMOE_REFERENCE", Path(__file__).resolve().parents[3] / "shared" / "reference"))


def load(folder):
    """Imports REF/folder/model.py (with its own manager.py) under a unique name."""
    d = str(REF / folder)
    sys.path.insert(0, d)
    for name in ("manager", "model"):
        sys.modules.pop(name, None)
    spec = importlib.util.spec_from_file_location(f"ref_{folder.replace('-', '_')}", os.path.join(d, "model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.path.remove(d)
    return mod


def perturb(model, seed):
    """Norm weights and biases start at 1 and 0: move every parameter so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if (p.dim() == 1 or "bias" in name) else 0.01
            p.add_(torch.randn(p.shape, generator=g) * scale)


def seed_model(d):
    M = load("nanomoe-seed-b2142af")
    return M, M.GPT.from_pretrained(d)


def cmd_make(d, cfg_json, seed):
    M = load("nanomoe-seed-b2142af")
    torch.manual_seed(int(seed))
    m = M.GPT(M.GPTConfig(**json.loads(cfg_json)))
    perturb(m, int(seed))
    m.save_pretrained(d)
    print(json.dumps({"ok": True}))


def cmd_logits(d, ids_json, out):
    from safetensors.torch import save_file
    _, m = seed_model(d)
    m.eval()
    ids = torch.tensor(json.loads(ids_json))
    with torch.no_grad():  # labels make the seed return every position's logits
        logits = m(ids, labels=torch.zeros_like(ids), return_dict=True).logits
    save_file({"logits": logits.contiguous()}, out)
    print(json.dumps({"shape": list(logits.shape)}))


def cmd_greedy(d, prompt_json, n):
    _, m = seed_model(d)
    m.eval()
    idx = torch.tensor([json.loads(prompt_json)])
    with torch.no_grad():
        for _ in range(int(n)):
            cond = idx[:, -m.config.block_size:]
            logits = m(cond, labels=torch.zeros_like(cond), return_dict=True).logits[:, -1, :]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    print(json.dumps({"ids": idx[0].tolist()}))


def cmd_grads(d, batch_json, out):
    from safetensors.torch import save_file
    x, y = json.loads(open(batch_json).read())
    grads = {}
    for tag, dtype in (("f64", torch.float64), ("f32", torch.float32)):
        _, m = seed_model(d)
        m.to(dtype)
        m.train()
        _, loss, _ = m(idx=torch.tensor(x), targets=torch.tensor(y), return_dict=False)
        loss.backward()
        for name, p in m.named_parameters():
            if p.grad is not None:
                grads[f"{tag}/{name}"] = p.grad.detach().double().contiguous()
    save_file(grads, out)
    print(json.dumps({"tensors": len(grads)}))


def cmd_train(d, run_json, out_dir):
    M, m = seed_model(d)
    run = json.loads(open(run_json).read())
    if run.get("float64"):
        m.double()
    m.train()
    opt = m.configure_optimizers(run["weight_decay"], run["lrs"][0], tuple(run["betas"]), "cpu")
    for g in opt.param_groups:
        g["eps"] = run["eps"]
        g["foreach"] = False
    keys = ["loss", "ntp_loss", "aux_loss", "router_z_loss", "router_ortho_loss", "experts_ortho_loss", "gate_output_loss"]
    hist = {k: [] for k in keys}
    for step, micro in enumerate(run["steps"]):
        for g in opt.param_groups:
            g["lr"] = run["lrs"][step]
        sums = {k: 0.0 for k in keys}
        for x, y in micro:
            _, loss, losses = m(idx=torch.tensor(x), targets=torch.tensor(y), return_dict=False)
            sums["loss"] += loss.item() / len(micro)
            for k in keys[1:]:
                v = losses.get(k, 0)
                sums[k] += (v.item() if torch.is_tensor(v) else float(v)) / len(micro)
            (loss / len(micro)).backward()
        if run["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(m.parameters(), run["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        for k in keys:
            hist[k].append(sums[k])
    m.float()
    m.save_pretrained(out_dir)
    print(json.dumps(hist))


def cmd_wolfe(ckpt, cfg_json, seed, ids_json, out):
    from safetensors.torch import save_file
    W = load("nanomoe-wolfecameron")
    args = json.loads(cfg_json)
    torch.manual_seed(int(seed))
    m = W.GPT(W.GPTConfig(**args))
    perturb(m, int(seed))
    m.eval()
    ids = torch.tensor(json.loads(ids_json))
    with torch.no_grad():
        logits, _ = m(ids, targets=torch.zeros_like(ids))
    save_file({"logits": logits.contiguous()}, out)
    torch.save({"model": m.state_dict(), "model_args": args, "iter_num": 0, "best_val_loss": 1e9, "config": {}}, ckpt)
    print(json.dumps({"shape": list(logits.shape)}))


if __name__ == "__main__":
    cmd = {"make": cmd_make, "logits": cmd_logits, "greedy": cmd_greedy, "grads": cmd_grads, "train": cmd_train, "wolfe": cmd_wolfe}[sys.argv[1]]
    cmd(*sys.argv[2:])

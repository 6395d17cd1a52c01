"""Reference training run in PyTorch through nanomoe's remote code.

usage: train_steps.py MODEL_DIR RUN_JSON OUT_DIR
RUN_JSON: {"steps": [[[x, y], ...micro batches], ...], "lrs": [...], "weight_decay": ..,
           "betas": [b1, b2], "eps": .., "grad_clip": ..}
Prints {"loss": [...], "ntp_loss": [...], "aux_loss": [...], "router_z_loss": [...]} and saves the
trained model to OUT_DIR.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM


def main(model_dir, run_json, out_dir):
    run = json.loads(open(run_json).read())
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    m.train()
    named = list(m.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2 and not n.endswith("bias")]
    other = [p for n, p in named if not (p.dim() >= 2 and not n.endswith("bias"))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": run["weight_decay"]}, {"params": other, "weight_decay": 0.0}],
        lr=run["lrs"][0], betas=tuple(run["betas"]), eps=run["eps"], foreach=False)
    hist = {"loss": [], "ntp_loss": [], "aux_loss": [], "router_z_loss": []}
    for step, micro in enumerate(run["steps"]):
        for g in opt.param_groups:
            g["lr"] = run["lrs"][step]
        sums = {k: 0.0 for k in hist}
        for x, y in micro:
            if m.config.model_type == "gpt2":  # dense models load as transformers' own GPT-2
                logits = m(input_ids=torch.tensor(x)).logits
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                         torch.tensor(y).reshape(-1), ignore_index=-1)
                losses = {"ntp_loss": loss}
            else:
                _, loss, losses = m(idx=torch.tensor(x), targets=torch.tensor(y), return_dict=False)
            sums["loss"] += loss.item() / len(micro)
            for k in ("ntp_loss", "aux_loss", "router_z_loss"):
                v = losses.get(k)
                sums[k] += (v.item() if v is not None else 0.0) / len(micro)
            (loss / len(micro)).backward()
        if run["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(m.parameters(), run["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        for k in hist:
            hist[k].append(sums[k])
    m.save_pretrained(out_dir)
    print(json.dumps(hist))


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""Writes the fuzz harness's ckpt.pt seeds with PyTorch (run once; the outputs are committed):
a nanoGPT checkpoint (torch.compile names, AdamW state, as nanoGPT's train.py saves it) and a
nanoMoE one.   usage: python fuzz/make_corpus.py   (with ./scripts/test's Python)"""
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "python"))
from test_convert import NanoGPT, save_ckpt  # noqa: E402

sys.path.insert(0, str(HERE.parent / "python" / "nanomoe_hf"))
from configuration_nanomoe_gpt import GPTConfig  # noqa: E402
from modeling_nanomoe_gpt import GPT  # noqa: E402

torch.manual_seed(0)
args = dict(n_layer=1, n_head=2, n_embd=8, block_size=8, bias=True, vocab_size=16, dropout=0.0)
out = HERE / "corpus" / "ckpt" / "nanogpt"
out.mkdir(parents=True, exist_ok=True)
save_ckpt(out / "ckpt.pt", NanoGPT(args), args)

args = dict(n_layer=2, n_head=2, n_embd=8, block_size=8, bias=False, vocab_size=16, dropout=0.0,
            n_exp=4, top_k=2, stride=2, use_aux_loss=True, use_router_z_loss=True, use_noisy_top_k=False,
            aux_loss_weight=0.01, router_z_loss_weight=0.001, train_capacity=1.25, eval_capacity=2.0,
            min_capacity=4, use_switch_tfm_init=True, switch_tfm_init_scale=1.0, router_use_full_prec=True)
m = GPT(GPTConfig(activation_function="gelu", **args))
out = HERE / "corpus" / "ckpt" / "nanomoe"
out.mkdir(parents=True, exist_ok=True)
torch.save({"model": m.state_dict(), "model_args": args, "iter_num": 1}, out / "ckpt.pt")

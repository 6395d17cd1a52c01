"""Benchmarks: nanomoe against PyTorch / transformers in the same run, on the same weights
and inputs. Prints medians, min-max, the ratio (ours / reference throughput) and each side's
peak resident memory; --json for machines.

usage: python bench/bench.py [--quick] [--json] [--only train,decode,prefill,moe,seed]
The seed rows (the seed's architecture: RMSNorm, QK-norm, ReLU^2, SwiGLU experts) take the
seed's own model.py from ../shared/reference as the reference, run with the transformers it
needs (NANOMOE_SEED_PYTHONPATH, as ./scripts/test sets it up: .ci/python-overlay.sh 4.57.6).
(bench/shakespeare_ref.py is the PyTorch side of the tiny-shakespeare benchmark of the README.)
Needs a release build (cargo build --release) and the test venv (torch, transformers).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
BIN = os.environ.get("NANOMOE_BIN", str(ROOT / "target" / "release" / "nanomoe"))
REF = [sys.executable, str(ROOT / "bench" / "ref.py")]


def timed(cmd, env=None):
    """Runs cmd under /usr/bin/time; returns (json result, peak RSS in MiB)."""
    p = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], capture_output=True, text=True,
                       env=None if env is None else {**os.environ, **env})
    if p.returncode != 0:
        raise SystemExit("failed: %s\n%s" % (" ".join(cmd), p.stderr[-2000:]))
    rss = [l for l in p.stderr.splitlines() if l.startswith("MAXRSS ")][-1].split()[1]
    line = [l for l in p.stdout.splitlines() if l.startswith("{")][-1]
    return json.loads(line), int(rss) / 1024


def new_model(tmp, name, conf):
    d = Path(tmp) / name
    if not d.exists():
        subprocess.run([BIN, "new", "--config", json.dumps(conf), "--out", str(d), "--seed", "0"], check=True,
                       capture_output=True)
    return str(d)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    ap.add_argument("--only", default="train,decode,prefill,moe,seed")
    a = ap.parse_args()
    only = set(a.only.split(","))
    steps, reps = (4, 2) if a.quick else (7, 3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "train" in only:
            base = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256, "bias": False, "activation_function": "gelu"}
            moe = {"n_exp": 8, "moe_top_k": 2, "stride": 2, "use_aux_loss": True, "use_router_z_loss": True}
            for vocab in (65, 50257):
                for kind, extra in (("dense", {}), ("moe", moe)):
                    name = "train-%s-v%d" % (kind, vocab)
                    model = new_model(tmp, name, dict(base, vocab_size=vocab, **extra))
                    g = torch.Generator().manual_seed(0)
                    data = torch.randint(0, vocab, (steps, 8, 257), generator=g)
                    inputs = str(Path(tmp) / (name + ".safetensors"))
                    save_file({"x": data[:, :, :-1].contiguous(), "y": data[:, :, 1:].contiguous()}, inputs)
                    ours = timed([BIN, "bench", "train", model, "--inputs", inputs])
                    ref = timed(REF + ["train", "--model", model, "--inputs", inputs])
                    rows.append((name + " (4x256, block 256, batch 8)", ours, ref))
        if "decode" in only or "prefill" in only:
            gpt2 = new_model(tmp, "gpt2-124m", {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "block_size": 1024})
            if "decode" in only:
                def decode(label, model, bf16):
                    """Rows for one model: ours f32 vs HF f32, and (bf16) ours bf16 vs the same HF run."""
                    args = ["--new-tokens", "128", "--repeats", str(reps)]
                    ref = timed(REF + ["decode", "--model", model, *args])
                    rows.append(("decode %s f32 (batch 1, 128 tokens)" % label, timed([BIN, "bench", "decode", model, *args]), ref))
                    if bf16:
                        ours = timed([BIN, "bench", "decode", model, *args, "--weight-dtype", "bf16"])
                        rows.append(("decode %s, ours bf16 weights vs HF f32" % label, ours, ref))

                moe = {"n_layer": 6, "n_head": 6, "n_embd": 384, "n_exp": 8, "moe_top_k": 2, "stride": 2, "bias": False}
                decode("gpt2-124m", gpt2, True)
                decode("nano-moe 6x384", new_model(tmp, "nano-moe", dict(moe, vocab_size=50304, block_size=1024)), True)
                # nanoGPT's shakespeare-char size (65 tokens): no large output layer.
                decode("nano-moe 6x384 char vocab", new_model(tmp, "nano-moe-char", dict(moe, vocab_size=65, block_size=256)), False)
            if "prefill" in only:
                ours = timed([BIN, "bench", "prefill", gpt2, "--tokens", "512", "--repeats", str(reps)])
                ref = timed(REF + ["prefill", "--model", gpt2, "--tokens", "512", "--repeats", str(reps)])
                rows.append(("prefill gpt2-124m 1x512", ours, ref))
        if "seed" in only:
            seed_path = os.environ.get("NANOMOE_SEED_PYTHONPATH")
            if not seed_path or not (ROOT.parent / "shared" / "reference" / "nanomoe-seed-b2142af").is_dir():
                print("seed rows skipped: needs ../shared/reference and NANOMOE_SEED_PYTHONPATH", file=sys.stderr)
            else:
                env = {"PYTHONPATH": seed_path}
                arch = {"norm_type": "rmsnorm", "layer_norm_epsilon": 1e-6, "qk_norm": True, "activation_function": "relu2",
                        "moe_placement": "end", "expert_mlp": "swiglu"}
                base = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256, "bias": False, "vocab_size": 65, **arch}
                moe = {"n_exp": 8, "moe_top_k": 2, "stride": 2, "use_aux_loss": True, "use_router_z_loss": True,
                       "use_router_ortho_loss": True, "use_experts_ortho_loss": True, "use_gate_output_loss": True}
                for kind, extra in (("dense", {}), ("moe", moe)):
                    name = "train-seed-%s-v65" % kind
                    model = new_model(tmp, name, dict(base, **extra))
                    g = torch.Generator().manual_seed(0)
                    data = torch.randint(0, 65, (steps, 8, 257), generator=g)
                    inputs = str(Path(tmp) / (name + ".safetensors"))
                    save_file({"x": data[:, :, :-1].contiguous(), "y": data[:, :, 1:].contiguous()}, inputs)
                    ours = timed([BIN, "bench", "train", model, "--inputs", inputs])
                    ref = timed(REF + ["train", "--seed-code", "--model", model, "--inputs", inputs], env)
                    rows.append((name + " vs the seed's model.py (4x256, block 256, batch 8%s)" % (
                        ", 8 SwiGLU experts top-2, stride 2, every loss" if extra else ""), ours, ref))
                args = ["--new-tokens", "128", "--repeats", str(reps)]
                seed_moe = new_model(tmp, "seed-moe-char", dict(arch, n_layer=6, n_head=6, n_embd=384, n_exp=8, moe_top_k=2,
                                                                 stride=2, bias=False, vocab_size=65, block_size=256))
                ref = timed(REF + ["decode", "--seed-code", "--model", seed_moe, *args], env)
                rows.append(("decode seed-arch moe 6x384 char vocab f32 vs the seed's generate_legacy (batch 1, 128 tokens)",
                             timed([BIN, "bench", "decode", seed_moe, *args]), ref))
        if "moe" in only:
            for e in (8, 16, 32, 64):
                args = ["--experts", str(e), "--tokens", "2048", "--n-embd", "256"]
                # ~0.07 s per run: 21 runs keep the median out of this shared machine's noise.
                ours = timed([BIN, "bench", "moe-layer", *args, "--repeats", "21"])
                ref = timed(REF + ["moe-layer", *args, "--repeats", str(reps + 2)])
                rows.append(("moe layer fwd+bwd, %d experts top-2, 2048 tokens x 256" % e, ours, ref))
    out = []
    for name, (o, orss), (r, rrss) in rows:
        out.append({"case": name, "ours": o, "reference": r, "ratio": o["tokens_per_sec"] / r["tokens_per_sec"],
                    "ours_peak_rss_mib": orss, "reference_peak_rss_mib": rrss})
    layer = {r["case"].split(",")[1].split()[0]: r for r in out if r["case"].startswith("moe layer")}
    growth = None
    if "8" in layer and "64" in layer:
        growth = {side: layer["64"][side]["median_s"] / layer["8"][side]["median_s"] for side in ("ours", "reference")}
    if a.json:
        print(json.dumps({"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}, "results": out,
                          "moe_layer_time_growth_8_to_64": growth}, indent=1))
        return
    print("| case | nanomoe tok/s (median, min-max s) | reference tok/s | ratio | peak RSS MiB (ours / ref) |")
    print("|---|---|---|---|---|")
    for r in out:
        o, ref = r["ours"], r["reference"]
        print("| %s | %.0f (%.3f, %.3f-%.3f) | %.0f (%.3f, %.3f-%.3f) | %.2fx | %.0f / %.0f |" % (
            r["case"], o["tokens_per_sec"], o["median_s"], o["min_s"], o["max_s"],
            ref["tokens_per_sec"], ref["median_s"], ref["min_s"], ref["max_s"], r["ratio"],
            r["ours_peak_rss_mib"], r["reference_peak_rss_mib"]))
    if growth:
        print("\nMoE layer time, 8 -> 64 experts (median): nanomoe %.2fx, reference %.2fx" % (growth["ours"], growth["reference"]))


if __name__ == "__main__":
    main()

"""Benchmarks: nanomoe against PyTorch / transformers in the same run, on the same weights
and inputs. Prints medians, min-max, the ratio (ours / reference throughput), each side's
peak resident memory and each side's share of the machine's ceilings measured in the same
run: f32 sgemm GFLOP/s (the gemm crate for nanomoe, PyTorch's BLAS for the reference, both on
every thread) for training, prefill and MoE-layer rows (model FLOP utilisation: 6 N + 12 L C T
FLOPs per token for training, a third of it for a forward pass), and streaming read bandwidth
for decoding (bytes of weights a token reads x tokens/s). Also records the CPU, its flags, the
threads and the versions. --json for machines.

usage: python bench/bench.py [--quick] [--json] [--json-out FILE] [--only train,decode,prefill,moe,seed,gguf,serve] [--rounds 3]
The train and gguf rows run each side --rounds times, taking turns (ours, the reference, ours,
...), so that a slow spell of a shared host falls on both sides; their ratio is the median of
the rounds' ratios, printed with its range, and their times are all the rounds' steps. The
train rows also measure both sides' product ceilings in every round, and their MFU is against
those.
The serve rows (bench/serve_load.py) load `nanomoe serve` with 1, 4, 16 and 64 streaming
clients on loopback (the nano-MoE and GPT-2 124M-shaped models, 128 tokens each; --quick: 1,
4, 16 clients, 64 tokens), and llama-server on the GPT-2 model's f32 GGUF where it is built;
then 1 and 16 nano-MoE clients that sample (temperature 0.8, top-k 40, top-p 0.95). Each
server runs its client counts --rounds times in turn (1, 4, 16, 64, 1, 4, ...); a row's
statistics are the medians of its rounds, and each target is the median of the rounds'
ratios (every round's 16 clients against the same round's single client), printed with them.
Then, per model, the same decoding steps with no HTTP side and no clients (`nanomoe bench
decode --packed` with 1 and 16 sequences, in turn, --rounds times): the p99 target computed
on the engine alone.
The gguf rows run llama.cpp (llama-bench, -t = the threads here) on the same GGUF files nanomoe
writes (f32, f16, bf16, q8_0, q4_0): NANOMOE_LLAMA_CPP_BIN, or ~/.cache/llama.cpp as
../shared/tools/build-llama-cpp.sh builds it; they skip without it.
Each training row runs twice on the reference side: PyTorch eager, and the same model under
torch.compile (inductor, CPU; its first two steps compile and are not timed), as nanoGPT's
compile=True does.
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
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
BIN = os.environ.get("NANOMOE_BIN", str(ROOT / "target" / "release" / "nanomoe"))
REF = [sys.executable, str(ROOT / "bench" / "ref.py")]


def run_measured(cmd, env=None):
    """Runs cmd under /usr/bin/time; returns (its stdout, peak RSS in MiB)."""
    p = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], capture_output=True, text=True,
                       env=None if env is None else {**os.environ, **env})
    if p.returncode != 0:
        raise SystemExit("failed: %s\n%s" % (" ".join(cmd), p.stderr[-2000:]))
    rss = [l for l in p.stderr.splitlines() if l.startswith("MAXRSS ")][-1].split()[1]
    return p.stdout, int(rss) / 1024


def timed(cmd, env=None):
    """Runs cmd (which prints a JSON result line last) under /usr/bin/time; returns (json
    result, peak RSS in MiB)."""
    out, rss = run_measured(cmd, env)
    return json.loads([l for l in out.splitlines() if l.startswith("{")][-1]), rss


def machine_info():
    """CPU model (with its family and model numbers: a virtual machine's model name can be
    the same for two generations, e.g. "AMD EPYC" on Zen 4 and Zen 5), the flags that decide
    the kernels, threads and versions."""
    cpu, flags, ids = "?", set(), {}
    for line in open("/proc/cpuinfo"):
        key = line.split(":", 1)[0].strip()
        if key == "model name" and cpu == "?":
            cpu = line.split(":", 1)[1].strip()
        if key in ("cpu family", "model") and key not in ids:
            ids[key] = line.split(":", 1)[1].strip()
        if key == "flags" and not flags:
            flags = set(line.split(":", 1)[1].split())
    if ids:
        cpu += " (family %s, model %s)" % (ids.get("cpu family", "?"), ids.get("model", "?"))
    want = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16"]
    version = subprocess.run([BIN, "--version"], capture_output=True, text=True).stdout.strip()
    import transformers
    return {"cpu": cpu, "flags": [f for f in want if f in flags], "threads": torch.get_num_threads(),
            "cores_seen": os.cpu_count(), "nanomoe": version, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0]}


def torch_sgemm_gflops(n=2048, repeats=7, dtype=torch.float32):
    """PyTorch's matrix product (f32, or bf16 with `dtype`: oneDNN, AMX where present) on its
    default threads: GFLOP/s of each timed run."""
    import time
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        out.append(2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return out


def round_ceilings(samples):
    """Both sides' f32 and bf16 product ceilings, 3 runs each, appended to `samples`: the train
    rows measure them in every round, so that their MFU compares a step with what the machine
    gave in the same minutes (a shared host's ceiling moves by 10 % within an hour); the best
    sample counts."""
    c, _ = timed([BIN, "bench", "ceilings", "--repeats", "3", "--mib", "64"])
    for key, v in (("gemm", c["sgemm_gflops"]), ("g16", c["bf16_gemm_gflops"]), ("torch", torch_sgemm_gflops(repeats=3)),
                   ("t16", torch_sgemm_gflops(repeats=3, dtype=torch.bfloat16))):
        samples.setdefault(key, []).extend(v)


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def merged(results):
    """Runs of one command (each `timed`'s (result, peak RSS)) as one result: all their times,
    the median over all, the largest peak RSS."""
    times = [t for r, _ in results for t in r["times_s"]]
    tokens = results[0][0]["tokens_per_sec"] * results[0][0]["median_s"]  # tokens per timed run
    return {"case": results[0][0].get("case"), "times_s": times, "median_s": median(times), "min_s": min(times),
            "max_s": max(times), "tokens_per_sec": tokens / median(times)}, max(rss for _, rss in results)


def paired(runs, rounds, pairs):
    """Runs each of `runs` (name -> a function returning `timed`'s (result, peak RSS)) once
    per round, in turn, so that the host's slow spells fall on every side alike; returns
    name -> merged result, and for each (a, b) in `pairs` the ratio of a's tokens/s to b's in
    every round (the spread a single back-to-back ratio hides)."""
    got = {name: [] for name in runs}
    ratios = {pair: [] for pair in pairs}
    for _ in range(rounds):
        for name, run in runs.items():
            got[name].append(run())
        for a, b in pairs:
            ratios[(a, b)].append(got[a][-1][0]["tokens_per_sec"] / got[b][-1][0]["tokens_per_sec"])
    return {name: merged(v) for name, v in got.items()}, ratios


def model_info(model):
    """(config, total parameters, active parameters) of a model directory."""
    p = subprocess.run([BIN, "info", model, "--json"], capture_output=True, text=True, check=True)
    v = json.loads(p.stdout)
    return json.loads((Path(model) / "config.json").read_text()), v["parameters"], v["active_parameters"]


def flops_per_token(model, t=None):
    """Training FLOPs per token, PaLM appendix B as nanoGPT counts them: 6 N (active
    parameters without the position embeddings) + 12 L C T."""
    c, _, active = model_info(model)
    C, L = c["n_embd"], c["n_layer"]
    T = t or c.get("block_size", c.get("n_positions"))
    n = active - c.get("block_size", c.get("n_positions")) * C
    return 6 * n + 12 * L * C * T


def prefill_flops_per_token(model, t):
    """Forward FLOPs per prompt token when only the last position gets logits (what
    `nanomoe bench prefill` and llama-bench -p run): 2 N for the blocks' active parameters,
    4 L C T for attention, and the output layer's 2 V C once per prompt."""
    c, _, active = model_info(model)
    C, L, V = c["n_embd"], c["n_layer"], c["vocab_size"]
    n = active - c.get("block_size", c.get("n_positions")) * C - V * C
    return 2 * n + 4 * L * C * t + 2 * V * C / t


def weight_bytes_per_token(model, bf16):
    """Bytes of weights one decoded token reads: the active parameters (experts that are not
    chosen are not read), 2 bytes each for bf16 matrices, 4 for f32."""
    _, _, active = model_info(model)
    return active * (2 if bf16 else 4)


def llama_bench_bin():
    b = os.environ.get("NANOMOE_LLAMA_CPP_BIN") or str(Path.home() / ".cache" / "llama.cpp" / "src" / "build" / "bin")
    return str(Path(b) / "llama-bench") if (Path(b) / "llama-bench").is_file() else None


def llama_bench(gguf, reps, prompt=0, gen=0, extra=()):
    """llama-bench on a GGUF file in the result format of `nanomoe bench`, and its peak RSS."""
    cmd = [llama_bench_bin(), "-m", gguf, "-p", str(prompt), "-n", str(gen), "-t", str(torch.get_num_threads()),
           "-r", str(reps), "-o", "json", *extra]
    out, rss = run_measured(cmd)
    times = [ns / 1e9 for ns in json.loads(out)[0]["samples_ns"]]
    n = prompt or gen
    return {"case": "llama-bench", "times_s": times, "median_s": median(times), "min_s": min(times), "max_s": max(times),
            "tokens_per_sec": n / median(times)}, rss


def against_llama(label, ours, gguf, reps, rounds, **kind):
    """(label, ours, llama-bench's result, the rounds' ratios) for a row against llama.cpp:
    `ours` (a function running our side) and llama-bench alternate for `rounds` rounds, after
    one llama-bench run that finds out whether it runs at all. Where llama-bench dies (its
    repacked q8_0 / q4_0 prompt path did, SIGILL or SIGSEGV, on an AMX machine) it runs
    without weight repacking (`--repack 0`), and the label says so; None if that dies too."""
    extra = ()
    try:
        llama_bench(gguf, reps, **kind)
    except SystemExit as e:
        print("%s: llama-bench failed, again with --repack 0: %s" % (label, str(e)[-200:].strip()), file=sys.stderr)
        extra, label = ("--repack", "0"), label + " (llama.cpp --repack 0)"
        try:
            llama_bench(gguf, reps, extra=extra, **kind)
        except SystemExit as e:
            print("%s: llama-bench failed, row left out: %s" % (label, str(e)[-200:].strip()), file=sys.stderr)
            return None
    got, ratios = paired({"ours": ours, "llama": lambda: llama_bench(gguf, reps, extra=extra, **kind)}, rounds, [("ours", "llama")])
    return label, got["ours"], got["llama"], ratios[("ours", "llama")]


def new_model(tmp, name, conf):
    d = Path(tmp) / name
    if not d.exists():
        subprocess.run([BIN, "new", "--config", json.dumps(conf), "--out", str(d), "--seed", "0"], check=True,
                       capture_output=True)
    return str(d)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--json-out", help="also write the JSON to this file")
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    ap.add_argument("--only", default="train,decode,prefill,moe,seed,gguf,serve")
    ap.add_argument("--rounds", type=int, default=3,
                    help="train and gguf rows: each side runs this many times, alternating, and the ratio is the median of "
                         "the rounds' ratios, printed with their range; serve rows: each server runs its client counts this "
                         "many times in turn, and each statistic is the median of the rounds")
    a = ap.parse_args()
    only = set(a.only.split(","))
    steps, reps = (4, 2) if a.quick else (7, 3)
    rows = []
    alone = []  # rows without a reference: (case, ours, weight bytes per token)
    serve = []  # (label, nanomoe load rows, llama-server load rows or None)
    engines = []  # (label, serve_load.engine_rows)
    machine = machine_info()
    ours_ceil, _ = timed([BIN, "bench", "ceilings", "--repeats", str(reps + 4)])
    ceilings = {"gemm_sgemm_gflops": ours_ceil["sgemm_gflops"], "torch_sgemm_gflops": torch_sgemm_gflops(repeats=reps + 4),
                "read_gbs": ours_ceil["read_gbs"], "bf16_gemm_gflops": ours_ceil["bf16_gemm_gflops"], "bf16_unit": ours_ceil["bf16_unit"],
                "torch_bf16_gemm_gflops": torch_sgemm_gflops(repeats=reps + 4, dtype=torch.bfloat16)}
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
                    # f32 and mixed precision (nanoGPT's dtype='bfloat16') on both sides: ours
                    # against eager f32 (the bars) and against PyTorch under CPU
                    # autocast bf16, in alternating rounds.
                    ceil = {}

                    def ours():
                        round_ceilings(ceil)
                        return timed([BIN, "bench", "train", model, "--inputs", inputs])

                    got, ratios = paired({
                        "ours": ours,
                        "ref": lambda: timed(REF + ["train", "--model", model, "--inputs", inputs]),
                        "half": lambda: timed([BIN, "bench", "train", model, "--inputs", inputs, "--dtype", "bfloat16"]),
                        "auto": lambda: timed(REF + ["train", "--autocast-bf16", "--model", model, "--inputs", inputs]),
                    }, a.rounds, [("ours", "ref"), ("half", "ref"), ("half", "auto")])
                    work = ("flops", flops_per_token(model), ceil)
                    rows.append((name + " (4x256, block 256, batch 8)", got["ours"], got["ref"], work, ratios[("ours", "ref")]))
                    try:  # the same nanomoe steps against the model under torch.compile (once: it compiles first)
                        comp = timed(REF + ["train", "--compile", "--model", model, "--inputs", inputs])
                        rows.append((name + " vs torch.compile (inductor)", got["ours"], comp, work))
                    except SystemExit as e:
                        print("torch.compile row for %s skipped: %s" % (name, str(e)[-300:]), file=sys.stderr)
                    rows.append((name + " bf16 vs PyTorch eager f32", got["half"], got["ref"], ("flops_bf16_vs_f32", work[1], ceil),
                                 ratios[("half", "ref")]))
                    rows.append((name + " bf16 vs PyTorch autocast bf16", got["half"], got["auto"], ("flops_bf16", work[1], ceil),
                                 ratios[("half", "auto")]))
        if "decode" in only or "prefill" in only:
            gpt2 = new_model(tmp, "gpt2-124m", {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "block_size": 1024})
            if "decode" in only:
                def decode(label, model, bf16):
                    """Rows for one model: ours f32 vs HF f32, and (bf16) ours bf16 vs the same HF run."""
                    args = ["--new-tokens", "128", "--repeats", str(reps)]
                    ref = timed(REF + ["decode", "--model", model, *args])
                    f32 = weight_bytes_per_token(model, False)
                    rows.append(("decode %s f32 (batch 1, 128 tokens)" % label, timed([BIN, "bench", "decode", model, *args]), ref,
                                 ("bytes", f32, f32)))
                    if bf16:
                        ours = timed([BIN, "bench", "decode", model, *args, "--weight-dtype", "bf16"])
                        rows.append(("decode %s, ours bf16 weights vs HF f32" % label, ours, ref,
                                     ("bytes", weight_bytes_per_token(model, True), f32)))

                moe = {"n_layer": 6, "n_head": 6, "n_embd": 384, "n_exp": 8, "moe_top_k": 2, "stride": 2, "bias": False}
                decode("gpt2-124m", gpt2, True)
                decode("nano-moe 6x384", new_model(tmp, "nano-moe", dict(moe, vocab_size=50304, block_size=1024)), True)
                # nanoGPT's shakespeare-char size (65 tokens): no large output layer.
                decode("nano-moe 6x384 char vocab", new_model(tmp, "nano-moe-char", dict(moe, vocab_size=65, block_size=256)), False)
            if "prefill" in only:
                ours = timed([BIN, "bench", "prefill", gpt2, "--tokens", "512", "--repeats", str(reps)])
                ref = timed(REF + ["prefill", "--model", gpt2, "--tokens", "512", "--repeats", str(reps)])
                rows.append(("prefill gpt2-124m 1x512", ours, ref, ("flops", prefill_flops_per_token(gpt2, 512))))
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
                        ", 8 SwiGLU experts top-2, stride 2, every loss" if extra else ""), ours, ref,
                        ("flops", flops_per_token(model))))
                args = ["--new-tokens", "128", "--repeats", str(reps)]
                seed_moe = new_model(tmp, "seed-moe-char", dict(arch, n_layer=6, n_head=6, n_embd=384, n_exp=8, moe_top_k=2,
                                                                 stride=2, bias=False, vocab_size=65, block_size=256))
                ref = timed(REF + ["decode", "--seed-code", "--model", seed_moe, *args], env)
                b = weight_bytes_per_token(seed_moe, False)
                rows.append(("decode seed-arch moe 6x384 char vocab f32 vs the seed's generate_legacy (batch 1, 128 tokens)",
                             timed([BIN, "bench", "decode", seed_moe, *args]), ref, ("bytes", b, b)))
        if "gguf" in only:
            if not llama_bench_bin():
                print("gguf rows skipped: llama.cpp's llama-bench not found (NANOMOE_LLAMA_CPP_BIN)", file=sys.stderr)
            else:
                gpt2 = new_model(tmp, "gpt2-124m", {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "block_size": 1024})
                moe = new_model(tmp, "nano-moe", {"n_layer": 6, "n_head": 6, "n_embd": 384, "n_exp": 8, "moe_top_k": 2, "stride": 2,
                                                  "bias": False, "vocab_size": 50304, "block_size": 1024})
                subprocess.run([BIN, "tokenize", "--tokenizer", "gpt2", "--save", gpt2], check=True, capture_output=True)
                args = ["--new-tokens", "128", "--repeats", str(reps)]
                _, moe_total, moe_active = model_info(moe)
                for dtype in ("f32", "f16", "bf16", "q8_0", "q4_0"):
                    f = str(Path(tmp) / ("gpt2-124m-%s.gguf" % dtype))
                    subprocess.run([BIN, "convert", gpt2, "--out", f, "--dtype", dtype], check=True, capture_output=True)
                    # Bytes a token reads: the file less the position embedding rows (one is read).
                    size = os.path.getsize(f) - 1024 * 768 * (2 if dtype in ("f16", "bf16") else 4)
                    label = "gguf decode gpt2-124m %s vs llama.cpp (batch 1, 128 tokens; GGUF %.0f MiB)" % (dtype, os.path.getsize(f) / 2**20)
                    row = against_llama(label, lambda: timed([BIN, "bench", "decode", f, *args]), f, reps, a.rounds, gen=128)
                    if row:
                        rows.append((*row[:3], ("bytes", size, size), row[3]))
                    if dtype in ("f32", "q8_0", "q4_0"):
                        label = "gguf prefill gpt2-124m %s 1x512 vs llama.cpp" % dtype
                        row = against_llama(label, lambda: timed([BIN, "bench", "prefill", f, "--tokens", "512", "--repeats", str(reps)]),
                                            f, reps, a.rounds, prompt=512)
                        if row:
                            rows.append((*row[:3], ("flops", prefill_flops_per_token(gpt2, 512)), row[3]))
                    fm = str(Path(tmp) / ("nano-moe-%s.gguf" % dtype))
                    subprocess.run([BIN, "convert", moe, "--out", fm, "--dtype", dtype], check=True, capture_output=True)
                    alone.append(("gguf decode nano-moe 6x384 (8 experts, top-2) %s (batch 1, 128 tokens)" % dtype,
                                  timed([BIN, "bench", "decode", fm, *args]), os.path.getsize(fm) * moe_active / moe_total))
        if "serve" in only:
            sys.path.insert(0, str(ROOT / "bench"))
            import serve_load
            clients, tokens = ([1, 4, 16], 64) if a.quick else ([1, 4, 16, 64], 128)
            threads = torch.get_num_threads()
            for label, conf in (("nano-moe 6x384", {"n_layer": 6, "n_head": 6, "n_embd": 384, "n_exp": 8, "moe_top_k": 2, "stride": 2,
                                                   "bias": False, "vocab_size": 50304, "block_size": 1024}),
                                ("gpt2-124m", {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "block_size": 1024})):
                d = new_model(tmp, label.split()[0], conf)
                subprocess.run([BIN, "tokenize", "--tokenizer", "gpt2", "--save", d], check=True, capture_output=True)
                theirs = None
                server = llama_bench_bin() and str(Path(llama_bench_bin()).with_name("llama-server"))
                if label == "gpt2-124m" and server and Path(server).is_file():
                    f = str(Path(tmp) / "serve-gpt2-f32.gguf")
                    subprocess.run([BIN, "convert", d, "--out", f, "--dtype", "f32"], check=True, capture_output=True)
                    d = f
                    theirs = serve_load.run_llama_server(server, f, tokens, clients, 16, threads, rounds=a.rounds)
                serve.append(("%s, %d tokens per client, --max-batch 16" % (label, tokens),
                              serve_load.run_model(d, tokens, clients, 16, threads, rounds=a.rounds), theirs))
                # The same steps without the HTTP side: what the engine and the host alone give.
                engines.append(("%s, %d tokens" % (label, tokens), serve_load.engine_rows(d, tokens, threads, rounds=a.rounds)))
                if label.startswith("nano-moe"):
                    # Clients that sample as chat UIs do (llama.cpp's defaults of top-k and top-p).
                    sampling = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": 1}
                    serve.append(("%s, sampling %s, %d tokens per client, --max-batch 16" % (label, json.dumps(sampling), tokens),
                                  serve_load.run_model(d, tokens, [1, 16], 16, threads, extra=sampling, rounds=a.rounds), None))
        if "moe" in only:
            for e in (8, 16, 32, 64):
                args = ["--experts", str(e), "--tokens", "2048", "--n-embd", "256"]
                # ~0.07 s per run: 21 runs keep the median out of this shared machine's noise.
                ours = timed([BIN, "bench", "moe-layer", *args, "--repeats", "21"])
                ref = timed(REF + ["moe-layer", *args, "--repeats", str(reps + 2)])
                # Forward + backward of the two chosen experts' products: 3 x 2 x 2 x (256 x 1024) x 2.
                rows.append(("moe layer fwd+bwd, %d experts top-2, 2048 tokens x 256" % e, ours, ref,
                             ("flops", 6 * 2 * 2 * 256 * 1024)))
    out = []
    run_ceilings = {k: median(ceilings[c]) for k, c in (("gemm", "gemm_sgemm_gflops"), ("torch", "torch_sgemm_gflops"),
                                                        ("g16", "bf16_gemm_gflops"), ("t16", "torch_bf16_gemm_gflops"))}
    bw = median(ceilings["read_gbs"])
    for name, (o, orss), (r, rrss), work, *rounds in rows:
        # Ceilings measured in the row's own rounds where it has them (the best of their
        # samples: a ceiling is what the machine can give, and a disturbed sample only reads
        # lower), else the run's.
        here = work[2] if work[0].startswith("flops") and len(work) > 2 else {}
        best = {k: max(v) for k, v in here.items()}
        gemm, tsgemm, g16, t16 = ({**run_ceilings, **best}[k] for k in ("gemm", "torch", "g16", "t16"))
        if work[0] == "flops":  # model FLOP utilisation against each side's sgemm ceiling
            share = (work[1] * o["tokens_per_sec"] / 1e9 / gemm, work[1] * r["tokens_per_sec"] / 1e9 / tsgemm)
        elif work[0] == "flops_bf16":  # both sides in bf16: against each side's bf16 product ceiling
            share = (work[1] * o["tokens_per_sec"] / 1e9 / g16, work[1] * r["tokens_per_sec"] / 1e9 / t16)
        elif work[0] == "flops_bf16_vs_f32":
            share = (work[1] * o["tokens_per_sec"] / 1e9 / g16, work[1] * r["tokens_per_sec"] / 1e9 / tsgemm)
        else:  # bytes of weights read per second over the read bandwidth
            share = (work[1] * o["tokens_per_sec"] / 1e9 / bw, work[2] * r["tokens_per_sec"] / 1e9 / bw)
        # Paired rows: the median of the rounds' ratios (their range printed with it).
        ratio = median(rounds[0]) if rounds else o["tokens_per_sec"] / r["tokens_per_sec"]
        out.append({"case": name, "ours": o, "reference": r, "ratio": ratio, "ratio_rounds": rounds[0] if rounds else None,
                    "ours_peak_rss_mib": orss, "reference_peak_rss_mib": rrss,
                    "share_of": "sgemm" if work[0].startswith("flops") else "read bandwidth", "ours_share": share[0], "reference_share": share[1],
                    "ceilings_in_rounds": best or None, "ceiling_samples_in_rounds": here or None})
    layer = {r["case"].split(",")[1].split()[0]: r for r in out if r["case"].startswith("moe layer")}
    growth = None
    if "8" in layer and "64" in layer:
        growth = {side: layer["64"][side]["median_s"] / layer["8"][side]["median_s"] for side in ("ours", "reference")}
    solo = [{"case": c, "ours": o, "ours_peak_rss_mib": rss, "weight_bytes_per_token": b,
             "ours_share_of_read_bandwidth": b * o["tokens_per_sec"] / 1e9 / bw} for c, (o, rss), b in alone]
    record = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "ceilings": ceilings, "results": out, "nanomoe_alone": solo,
              "serve": [{"case": c, "nanomoe": o, "llama_server": t} for c, o, t in serve],
              "serve_engine": [{"case": c, "rows": e} for c, e in engines],
              "moe_layer_time_growth_8_to_64": growth}
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(record, indent=1))
    if a.json:
        print(json.dumps(record, indent=1))
        return
    spread = lambda v: "%.0f (%.0f-%.0f)" % (median(v), min(v), max(v))
    print("%s; %s; flags %s; %d threads; %s, torch %s, transformers %s" % (
        time.strftime("%Y-%m-%d"), machine["cpu"], " ".join(machine["flags"]) or "-", machine["threads"], machine["nanomoe"],
        machine["torch"], machine["transformers"]))
    print("ceilings: f32 sgemm 2048^3 %s GFLOP/s with gemm (nanomoe), %s with PyTorch; bf16 products 2048^3 %s GFLOP/s "
          "with nanomoe's bf16 kernel (%s), %s with PyTorch; read bandwidth %s GB/s\n" % (
        spread(ceilings["gemm_sgemm_gflops"]), spread(ceilings["torch_sgemm_gflops"]), spread(ceilings["bf16_gemm_gflops"]),
        ceilings["bf16_unit"], spread(ceilings["torch_bf16_gemm_gflops"]), spread(ceilings["read_gbs"])))
    print("| case | nanomoe tok/s (median, min-max s) | reference tok/s | ratio | share of ceiling (ours / ref) | peak RSS MiB (ours / ref) |")
    print("|---|---|---|---|---|---|")
    for r in out:
        o, ref = r["ours"], r["reference"]
        rr = r["ratio_rounds"]
        ratio = "%.2fx" % r["ratio"] + (" (%.2f-%.2f)" % (min(rr), max(rr)) if rr and len(rr) > 1 else "")
        print("| %s | %.0f (%.3f, %.3f-%.3f) | %.0f (%.3f, %.3f-%.3f) | %s | %.0f%% / %.0f%% %s | %.0f / %.0f |" % (
            r["case"], o["tokens_per_sec"], o["median_s"], o["min_s"], o["max_s"],
            ref["tokens_per_sec"], ref["median_s"], ref["min_s"], ref["max_s"], ratio,
            100 * r["ours_share"], 100 * r["reference_share"], "MFU" if r["share_of"] == "sgemm" else "of bw",
            r["ours_peak_rss_mib"], r["reference_peak_rss_mib"]))
    here = [(r["case"], r["ceilings_in_rounds"]) for r in out if r["ceilings_in_rounds"] and r["case"].endswith("batch 8)")]
    if here:
        print("\nThe train rows' MFU is against the ceilings measured in their own rounds (GFLOP/s, the best sample): " + "; ".join(
            "%s: f32 %.0f gemm / %.0f PyTorch, bf16 %.0f / %.0f" % (c.split(" ")[0], h["gemm"], h["torch"], h["g16"], h["t16"])
            for c, h in here))
    if solo:
        print("\n| case (nanomoe alone: llama.cpp has no MoE GPT-2) | tok/s (median, min-max s) | weight MB per token | share of bw | peak RSS MiB |")
        print("|---|---|---|---|---|")
        for r in solo:
            o = r["ours"]
            print("| %s | %.0f (%.3f, %.3f-%.3f) | %.1f | %.0f%% | %.0f |" % (r["case"], o["tokens_per_sec"], o["median_s"], o["min_s"],
                  o["max_s"], r["weight_bytes_per_token"] / 1e6, 100 * r["ours_share_of_read_bandwidth"], r["ours_peak_rss_mib"]))
    for label, o, t in serve:
        serve_load.report("nanomoe serve, " + label, o)
        if t:
            serve_load.report("llama-server (-np 16), " + label, t)
    for label, e in engines:
        serve_load.engine_report("nanomoe, " + label, e)
    if growth:
        print("\nMoE layer time, 8 -> 64 experts (median): nanomoe %.2fx, reference %.2fx" % (growth["ours"], growth["reference"]))


if __name__ == "__main__":
    main()

"""Distributed training on one machine: `mpirun -np 2 nanomoe train` (one thread per
process; data parallel, then expert parallel) against one process with two threads, on the
4x256 MoE training case (n_exp 8, top-2, every second block, block 256, batch 8,
2 micro batches per step; the built-in grammar corpus as data, so nothing to prepare).

usage: python bench/mpi_train.py [--steps N] [--repeats R] [--json]

Prints tokens/s (median over steps after two warm-up steps, and the spread over repeats),
each distributed run's ratio to the one-process run measured in the same invocation, the
payload rank 0 sent per step and the share of its step it was blocked on collectives (from
metrics.jsonl). Data parallel runs once as `auto` picks on this machine and once with the
all-reduce overlapping the backward forced on. Needs a
nanomoe built with `--features mpi` (NANOMOE_BIN, default target/release/nanomoe) and mpirun.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = os.environ.get("NANOMOE_BIN", str(ROOT / "target" / "release" / "nanomoe"))

MODEL = ["--n_layer=4", "--n_head=4", "--n_embd=256", "--block_size=256", "--bias=false",
         "--activation_function=gelu", "--n_exp=8", "--moe_top_k=2", "--stride=2",
         "--use_aux_loss=true", "--use_router_z_loss=true", "--dropout=0.0"]


def run(out, np, threads, steps, extra):
    args = [BIN, "train", "--data_dir=builtin:grammar", "--out_dir=" + str(out), "--overwrite=true",
            "--batch_size=8", "--gradient_accumulation_steps=2", "--max_iters=%d" % steps,
            "--eval_interval=100000", "--eval_iters=1", "--log_interval=1", "--threads=%d" % threads] + MODEL + extra
    if np > 1:
        args = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(np)] + args
    env = dict(os.environ, OMPI_MCA_btl_vader_single_copy_mechanism="none")
    subprocess.run(args, check=True, capture_output=True, env=env)
    tps, sent, busy = [], [], []
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        v = json.loads(line)
        if "tokens_per_sec" in v and v["iter"] > 2:
            tps.append(v["tokens_per_sec"])
        if "bytes_sent_per_step" in v and v["iter"] > 2:
            sent.append(v["bytes_sent_per_step"])
            busy.append(v["seconds_blocked_in_collectives_per_step"])
    step_s = 4096 / statistics.median(tps)
    share = statistics.median(busy) / step_s if busy else 0.0
    return statistics.median(tps), (statistics.median(sent) if sent else 0.0), share


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not shutil.which("mpirun"):
        sys.exit("mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev libclang-dev)")
    cases = [("1 process x 2 threads", 1, 2, []),
             ("mpirun -np 2 x 1 thread, data parallel", 2, 1, []),
             ("mpirun -np 2 x 1 thread, data parallel, overlap_grad_reduce=on", 2, 1, ["--overlap_grad_reduce=on"]),
             ("mpirun -np 2 x 1 thread, expert parallel", 2, 1, ["--expert_parallel=true"])]
    results = {c[0]: ([], [], []) for c in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):  # interleaved, so that drifts of the machine hit every case
            for label, np_, threads, extra in cases:
                tps, sent, share = run(Path(tmp) / "run", np_, threads, a.steps, extra)
                results[label][0].append(tps)
                results[label][1].append(sent)
                results[label][2].append(share)
    base = statistics.median(results[cases[0][0]][0])
    rows = []
    for label, *_ in cases:
        tps, sent, share = results[label]
        rows.append({"case": label, "tokens_per_sec": statistics.median(tps), "min": min(tps), "max": max(tps),
                     "ratio": statistics.median(tps) / base, "bytes_sent_per_step": statistics.median(sent),
                     "time_in_collectives": statistics.median(share)})
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print("4x256 MoE (8 experts, top-2), block 256, batch 8 x 2 micro batches = 4096 tokens per step, %d steps x %d repeats"
          % (a.steps, a.repeats))
    print("| case | tokens/s (min-max) | vs 1 process | payload sent per step (rank 0) | step time blocked on collectives (rank 0) |")
    print("|---|---|---|---|---|")
    for r in rows:
        dist = r["bytes_sent_per_step"] > 0
        print("| %s | %.0f (%.0f-%.0f) | %.2fx | %s | %s |" % (
            r["case"], r["tokens_per_sec"], r["min"], r["max"], r["ratio"],
            "%.2f MB" % (r["bytes_sent_per_step"] / 1e6) if dist else "-",
            "%.1f %%" % (100 * r["time_in_collectives"]) if dist else "-"))


if __name__ == "__main__":
    main()

"""nanoGPT's own train.py (../shared/reference/nanogpt, unmodified) on the tiny-shakespeare data
`nanomoe prepare --tokenizer char` made, with nanoGPT's README CPU recipe - the reference of
the README's tiny-shakespeare timing. The same recipe is config/shakespeare-char.toml for
`nanomoe train`.

usage: python bench/nanogpt_shakespeare.py --data DATA_DIR [--seed 1337] [--max-iters 2000]
Prints one JSON line: wall time, the val losses nanoGPT reported at each evaluation, the best
one, and tokens/s over its iterations.
"""
import argparse
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NANOGPT = Path(os.environ.get("NANOMOE_REFERENCE", ROOT.parent / "shared" / "reference")) / "nanogpt"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a directory made by nanomoe prepare --tokenizer char")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--max-iters", type=int, default=2000)
    a = ap.parse_args()
    if not (NANOGPT / "train.py").is_file():
        raise SystemExit(f"nanoGPT's train.py is not at {NANOGPT} (../shared/reference/nanogpt)")
    data = Path(a.data).resolve()
    meta = json.loads((data / "meta.json").read_text())
    with tempfile.TemporaryDirectory() as work:
        w = Path(work)
        # train.py reads configurator.py and data/<dataset>/ from its working directory.
        (w / "configurator.py").symlink_to(NANOGPT / "configurator.py")
        d = w / "data" / "shakespeare_char"
        d.mkdir(parents=True)
        for f in ("train.bin", "val.bin"):
            (d / f).symlink_to(data / f)
        with open(d / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": meta["vocab_size"]}, f)
        # nanoGPT's README CPU recipe (its seed is 1337 + rank; --seed offsets it through
        # nothing nanoGPT exposes, so only 1337 is nanoGPT's own).
        cmd = [sys.executable, str(NANOGPT / "train.py"), str(NANOGPT / "config" / "train_shakespeare_char.py"),
               "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=10", "--block_size=64",
               "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", f"--max_iters={a.max_iters}",
               f"--lr_decay_iters={a.max_iters}", "--dropout=0.0", f"--out_dir={w / 'out'}"]
        t = time.perf_counter()
        p = subprocess.run(cmd, cwd=w, capture_output=True, text=True)
        wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    vals = [(int(m[1]), float(m[3])) for m in re.finditer(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", p.stdout)]
    ms = [float(m[1]) for m in re.finditer(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", p.stdout)][1:]
    ms.sort()
    tok = 12 * 64 / (ms[len(ms) // 2] / 1000) if ms else None
    print(json.dumps({"wall_s": wall, "val_losses": vals, "best_val": min(v for _, v in vals), "median_tokens_per_sec": tok}))


if __name__ == "__main__":
    main()

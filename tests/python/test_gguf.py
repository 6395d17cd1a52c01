"""GGUF interop: nanomoe's q8_0 / q4_0 blocks equal the `gguf` package's quantizer byte for
byte; HF -> GGUF round trips (f32 exact, q8_0 within what the `gguf` package's dequantized
weights predict); a GGUF written by llama.cpp's own convert_hf_to_gguf.py loads with the
directory's logits; llama.cpp's `llama-completion` prints nanomoe's greedy text.

The llama.cpp tests need its binaries and source (NANOMOE_LLAMA_CPP_BIN / _SRC, set by
scripts/test from ../shared/tools/build-llama-cpp.sh) and skip with a message without them.
"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run, rust_forward

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (.ci/python-env.sh installs it)")

LLAMA_BIN = os.environ.get("NANOMOE_LLAMA_CPP_BIN", "")
LLAMA_SRC = os.environ.get("NANOMOE_LLAMA_CPP_SRC", "")
needs_llama_bin = pytest.mark.skipif(not (LLAMA_BIN and (Path(LLAMA_BIN) / "llama-completion").is_file()),
                                     reason="llama.cpp's binaries are absent (NANOMOE_LLAMA_CPP_BIN): llama.cpp test skipped")
needs_llama_src = pytest.mark.skipif(not (LLAMA_SRC and (Path(LLAMA_SRC) / "convert_hf_to_gguf.py").is_file()),
                                     reason="llama.cpp's convert_hf_to_gguf.py is absent (NANOMOE_LLAMA_CPP_SRC): test skipped")

PROMPT = "Hello, my name is"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A GPT-2-architecture model with the GPT-2 tokenizer, written by nanomoe. Weights are
    drawn wider than GPT-2's init so that greedy text does not repeat one token."""
    import transformers
    src = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=50257, initializer_range=0.3)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(src)
    d = tmp_path_factory.mktemp("gpt2") / "model"
    run("convert", src, "--out", d)
    run("tokenize", "--tokenizer", "gpt2", "--save", d)
    return d


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """An MoE model whose weights hold the cases quantizers get wrong: an all-zero block,
    exact halves (ties), a block whose largest magnitude appears twice with both signs,
    tiny and huge values."""
    from safetensors.numpy import load_file, save_file
    d = tmp_path_factory.mktemp("moe") / "model"
    run("new", "--config", json.dumps({"n_layer": 2, "n_head": 2, "n_embd": 64, "n_exp": 4, "moe_top_k": 2,
                                       "stride": 2, "block_size": 32, "vocab_size": 96}), "--out", d, "--seed", "3")
    f = d / "model.safetensors"
    t = load_file(str(f))
    w = t["transformer.h.0.attn.c_attn.weight"]
    w[0, :32] = 0.0
    w[1, :32] = np.arange(32, dtype=np.float32) * 0.5 - 8.0     # halves; amax 8 -> id = 127/8 ...
    w[2, :32] = np.float32(0.25) * (np.arange(32) % 5 - 2)        # many ties of the largest magnitude
    w[3, :32] = 0.0
    w[3, 5], w[3, 9] = 0.7, -0.7                                   # equal magnitude, both signs
    w[4, :32] = np.float32(1e-30)
    w[5, :32] = np.float32(3e4) * np.linspace(-1, 1, 32, dtype=np.float32)
    t["transformer.h.0.attn.c_attn.weight"] = w
    save_file(t, str(f), metadata={"format": "pt"})
    return d


def read_gguf(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_blocks_equal_the_gguf_package(moe_dir, tmp_path, qtype):
    from safetensors.numpy import load_file
    out = tmp_path / f"m-{qtype}.gguf"
    run("convert", moe_dir, "--out", out, "--dtype", qtype)
    weights = load_file(str(moe_dir / "model.safetensors"))
    _, tensors = read_gguf(out)
    kind = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[qtype]
    names = {
        "blk.0.attn_qkv.weight": ("transformer.h.0.attn.c_attn.weight", False),
        "blk.1.attn_output.weight": ("transformer.h.1.attn.c_proj.weight", False),
        "blk.0.ffn_up.weight": ("transformer.h.0.mlp.c_fc.weight", False),
        "blk.1.ffn_up_exps.weight": ("transformer.h.1.mlp.experts.c_fc", True),
        "blk.1.ffn_down_exps.weight": ("transformer.h.1.mlp.experts.c_proj", True),
        "token_embd.weight": ("transformer.wte.weight", False),
    }
    for gname, (ours, experts) in names.items():
        t = tensors[gname]
        assert t.tensor_type == kind, gname
        w = weights[ours].astype(np.float32)
        if experts:
            w = np.ascontiguousarray(np.transpose(w, (0, 2, 1)))     # [E, N, K]: rows along K
        want = gguf.quants.quantize(w, kind)
        got = np.asarray(t.data).reshape(want.shape)
        assert np.array_equal(got, want), f"{gname}: {np.count_nonzero(got != want)} bytes differ"
    # Norms, biases and routers stay f32.
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def hf_logits_with(model_dir, ids, replace=None):
    """transformers' logits of a GPT-2 directory, its weights optionally replaced (name -> array)."""
    import transformers
    m = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
    if replace:
        sd = m.state_dict()
        for k, v in replace.items():
            sd[k].copy_(torch.from_numpy(v))
    with torch.no_grad():
        return m(torch.tensor(ids)).logits


IDS = [[15496, 11, 616, 1438, 318, 257, 1332, 286, 262, 4756, 3303, 13]]


def test_f32_round_trip_is_exact(gpt2_dir, tmp_path):
    out = tmp_path / "m.gguf"
    run("convert", gpt2_dir, "--out", out, "--dtype", "f32")
    a, _ = rust_forward(gpt2_dir, IDS, tmp=tmp_path)
    b, _ = rust_forward(out, IDS, tmp=tmp_path)
    assert torch.equal(a, b)
    # ... and back to an HF directory transformers loads, with the same logits.
    back = tmp_path / "back"
    run("convert", out, "--out", back)
    assert torch.allclose(hf_logits_with(back, IDS), a, atol=1e-4, rtol=0)


def test_q8_0_logits_match_the_gguf_packages_dequantized_weights(gpt2_dir, tmp_path):
    out = tmp_path / "m.gguf"
    run("convert", gpt2_dir, "--out", out, "--dtype", "q8_0")
    _, tensors = read_gguf(out)
    names = {"token_embd.weight": "transformer.wte.weight"}
    for i in range(2):
        names[f"blk.{i}.attn_qkv.weight"] = f"transformer.h.{i}.attn.c_attn.weight"
        names[f"blk.{i}.attn_output.weight"] = f"transformer.h.{i}.attn.c_proj.weight"
        names[f"blk.{i}.ffn_up.weight"] = f"transformer.h.{i}.mlp.c_fc.weight"
        names[f"blk.{i}.ffn_down.weight"] = f"transformer.h.{i}.mlp.c_proj.weight"
    replace = {}
    for g, ours in names.items():
        t = tensors[g]
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        replace[ours] = w if ours.endswith("wte.weight") else np.ascontiguousarray(w.T)   # HF GPT-2's Conv1D is [in, out]
    predicted = hf_logits_with(gpt2_dir, IDS, replace)
    exact = hf_logits_with(gpt2_dir, IDS)
    ours, _ = rust_forward(out, IDS, tmp=tmp_path)
    weight_err = (predicted - exact).abs().max().item()
    our_err = (ours - exact).abs().max().item()
    # The weights' rounding predicts the error; nanomoe adds the rounding of its 8-bit
    # activations (as llama.cpp does), of the same order, not more.
    assert 0 < weight_err < 0.05 * exact.abs().max().item()
    assert our_err <= 3 * weight_err, (our_err, weight_err)
    # (A random model has near-ties: most positions, not all, keep their top token.)
    assert (ours.argmax(-1) == predicted.argmax(-1)).float().mean().item() >= 0.75


@needs_llama_src
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_a_gguf_from_convert_hf_to_gguf_loads(gpt2_dir, tmp_path, outtype):
    out = tmp_path / f"llama-{outtype}.gguf"
    env = {**os.environ, "PYTHONPATH": str(Path(LLAMA_SRC) / "gguf-py")}
    p = subprocess.run([os.environ.get("NANOMOE_PYTHON", "python"), str(Path(LLAMA_SRC) / "convert_hf_to_gguf.py"), str(gpt2_dir),
                        "--outtype", outtype, "--outfile", str(out)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    ref, _ = rust_forward(gpt2_dir, IDS, tmp=tmp_path)
    got, _ = rust_forward(out, IDS, tmp=tmp_path)
    if outtype == "f32":
        assert torch.equal(got, ref)
    else:
        # llama.cpp's converter and nanomoe quantize the same blocks the same way.
        ours = tmp_path / "ours-q8_0.gguf"
        run("convert", gpt2_dir, "--out", ours, "--dtype", "q8_0")
        mine, _ = rust_forward(ours, IDS, tmp=tmp_path)
        assert (got - mine).abs().max().item() <= 0.02 * ref.abs().max().item()
    # Its tokenizer (llama.cpp's arrays, no tokenizer.json) encodes and decodes as GPT-2's.
    a = json.loads(run("generate", gpt2_dir, "--prompt", PROMPT, "--greedy", "--max-new-tokens", "8", "--ignore-eos", "--json"))
    b = json.loads(run("generate", out, "--prompt", PROMPT, "--greedy", "--max-new-tokens", "8", "--ignore-eos", "--json"))
    if outtype == "f32":
        assert a == b


@needs_llama_bin
@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_llama_completion_prints_nanomoes_greedy_text(gpt2_dir, tmp_path, dtype):
    out = tmp_path / f"m-{dtype}.gguf"
    run("convert", gpt2_dir, "--out", out, "--dtype", dtype)
    n = 24
    ours = run("generate", out, "--prompt", PROMPT, "--greedy", "--max-new-tokens", n, "--ignore-eos")
    # -nr (no weight repacking): llama.cpp's repacked q8_0 path dies of SIGSEGV on an AMX
    # machine (the layout in memory changes, not the model or the sampling).
    p = subprocess.run([str(Path(LLAMA_BIN) / "llama-completion"), "-m", str(out), "-p", PROMPT, "-n", str(n), "--temp", "0",
                        "-t", "2", "--ignore-eos", "--no-warmup", "-no-cnv", "-nr"], capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:].decode(errors="replace")
    theirs = p.stdout.decode(errors="replace")
    assert ours.strip() == theirs.strip(), (ours, theirs)
    assert len(set(ours.split())) > 6, "the text should not repeat one token"

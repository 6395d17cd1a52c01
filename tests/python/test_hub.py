"""Hub downloads against a local stand-in, checked with Python's huggingface_hub and
transformers on the same cache."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ids_arg, nanomoe_bin, run
from hub_standin import TOKEN, Hub

IDS = [[1, 2, 3, 4, 5, 6, 7, 8]]


@pytest.fixture
def hub():
    h = Hub()
    yield h
    h.close()


def model_files(tmp_path, conf, seed=1):
    d = tmp_path / ("src%d" % seed)
    run("new", "--config", json.dumps(conf), "--out", d, "--seed", seed)
    run("tokenize", "--tokenizer", "gpt2", "--save", d)
    return d, {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def env(hub, cache, **extra):
    e = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_XET="1",
             HF_HOME=str(Path(cache).parent / "hfhome"))
    e.pop("HF_TOKEN", None)
    e.pop("HF_HUB_OFFLINE", None)
    e.update(extra)
    return e


def nm(e, *args):
    p = subprocess.run([nanomoe_bin(), *map(str, args)], capture_output=True, text=True, env=e)
    return p.returncode, p.stdout, p.stderr


def logits(e, model, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "l.safetensors"
    code, so, se = nm(e, "forward", model, "--ids", ids_arg(IDS), "--out", out)
    assert code == 0, se
    return load_file(str(out))["logits"]


DENSE = {"n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": 50257, "block_size": 32}
MOE = {"n_layer": 2, "n_head": 2, "n_embd": 16, "vocab_size": 64, "block_size": 32, "n_exp": 4, "stride": 2}


@pytest.mark.parametrize("conf", [DENSE, MOE])
def test_nanomoe_download_is_reused_by_python(tmp_path, hub, conf):
    from huggingface_hub import snapshot_download
    d, files = model_files(tmp_path, conf)
    sha = hub.add("owner/model", files)
    cache = tmp_path / "cache"
    e = env(hub, cache)
    want = logits(e, d, tmp_path)
    got = logits(e, "owner/model", tmp_path)
    assert (got - want).abs().max().item() == 0.0
    assert hub.count("store") >= 1 and hub.store_auth_seen == []
    snap = cache / "models--owner--model" / "snapshots" / sha
    assert (cache / "models--owner--model" / "refs" / "main").read_text() == sha
    for name in ["config.json", "model.safetensors"]:
        assert (snap / name).is_symlink() and not os.path.isabs(os.readlink(snap / name))
    # Python finds nanomoe's download offline, byte-identical.
    os.environ.update(e)
    try:
        p = snapshot_download("owner/model", cache_dir=str(cache), local_files_only=True)
    finally:
        for k in ("HF_ENDPOINT", "HF_HUB_CACHE", "HF_HUB_DISABLE_XET", "HF_HOME"):
            os.environ.pop(k, None)
    assert Path(p) == snap
    for name, data in files.items():
        assert (snap / name).read_bytes() == data
    # A second load makes no request at all.
    before = hub.count()
    logits(e, "owner/model", tmp_path)
    assert hub.count() == before


def test_python_download_is_used_offline_with_zero_requests(tmp_path, hub):
    d, files = model_files(tmp_path, MOE, seed=2)
    hub.add("owner/py", files)
    cache = tmp_path / "cache"
    e = env(hub, cache)
    code = subprocess.run(["python", "-c", "from huggingface_hub import snapshot_download; snapshot_download('owner/py')"],
                          env=dict(e, PATH=str(Path(os.sys.executable).parent) + ":" + e["PATH"]), capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    before = hub.count() + hub.count("store")
    got = logits(dict(e, HF_HUB_OFFLINE="1"), "owner/py", tmp_path)
    assert (got - logits(e, d, tmp_path)).abs().max().item() == 0.0
    assert hub.count() + hub.count("store") == before
    code, _, err = nm(dict(e, HF_HUB_OFFLINE="1"), "info", "owner/other")
    assert code != 0 and "HF_HUB_OFFLINE is set and the snapshot of owner/other at main is not in the cache" in err
    # A cache that lost a file: the error names it.
    snap = next((cache / "models--owner--py" / "snapshots").iterdir())
    (snap / "model.safetensors").unlink()
    code, _, err = nm(dict(e, HF_HUB_OFFLINE="1"), "info", "owner/py")
    assert code != 0 and "HF_HUB_OFFLINE is set and model.safetensors of owner/py at main is not in the cache" in err


def test_private_repos_token_and_errors(tmp_path, hub):
    d, files = model_files(tmp_path, MOE, seed=3)
    hub.add("owner/private", files, private=True)
    cache = tmp_path / "cache"
    e = env(hub, cache)
    code, out, err = nm(e, "info", "owner/private")
    assert code != 0 and "repo owner/private not found" in err and "set HF_TOKEN" in err
    e_tok = dict(e, HF_TOKEN=TOKEN)
    code, out, err = nm(e_tok, "info", "owner/private")
    assert code == 0, err
    assert hub.store_auth_seen == []
    assert TOKEN not in out + err
    for root, _, names in os.walk(tmp_path):
        for n in names:
            p = Path(root) / n
            if p.is_file() and not p.is_symlink():
                assert TOKEN.encode() not in p.read_bytes(), p
    # The token file under HF_HOME works too.
    (Path(e["HF_HOME"])).mkdir(parents=True, exist_ok=True)
    (Path(e["HF_HOME"]) / "token").write_text(TOKEN)
    code, _, err = nm(dict(e, HF_HUB_CACHE=str(tmp_path / "cache2")), "info", "owner/private")
    assert code == 0, err
    (Path(e["HF_HOME"]) / "token").unlink()
    # Errors name the cause.
    code, _, err = nm(e, "info", "owner/nothing")
    assert "repo owner/nothing not found" in err
    hub.add("owner/public", files)
    code, _, err = nm(e, "info", "owner/public", "--revision", "v9")
    assert code != 0 and 'revision "v9" not found in repo owner/public' in err
    code, _, err = nm(dict(e, HF_ENDPOINT="http://127.0.0.1:9"), "info", "owner/public")
    assert code != 0 and "network unreachable" in err


@pytest.mark.parametrize("fault,message", [
    ("unauthorized", "unauthorized for faults/unauthorized (401)"),
    ("ghostfile", "file model-00009-of-00009.safetensors not found in faults/ghostfile"),
    ("truncate", "is truncated"),
    ("badsha", "download corrupted"),
    ("traversal", "would escape the cache"),
    # A server that never answers, or stops sending, is given up on after
    # HF_HUB_DOWNLOAD_TIMEOUT seconds without data (it would answer after 30 s).
    ("silent", "did not answer within 1 s (HF_HUB_DOWNLOAD_TIMEOUT)"),
    ("stall", "is truncated: no data for 1 s (HF_HUB_DOWNLOAD_TIMEOUT)"),
    # Without Content-Length a clean close looks complete: the git blob id catches it.
    ("nolength", "but the Hub says"),
])
def test_hostile_answers_are_refused(tmp_path, hub, fault, message):
    d, files = model_files(tmp_path, MOE, seed=4)
    hub.add("faults/" + fault, files)
    hub.faults["faults/" + fault] = fault
    cache = tmp_path / "cache"
    code, _, err = nm(env(hub, cache, HF_HUB_DOWNLOAD_TIMEOUT="1"), "info", "faults/" + fault)
    assert code != 0 and message in err, err
    assert err.count("\n") == 1
    snaps = cache / ("models--faults--" + fault) / "snapshots"
    # Nothing incomplete in a snapshot: every linked file is whole.
    for root, _, names in os.walk(snaps) if snaps.exists() else []:
        for n in names:
            p = Path(root) / n
            assert p.read_bytes() == files[n]
    assert not (tmp_path / "escape.txt").exists()


def test_protocol_relative_redirect_goes_to_the_named_host(tmp_path, hub):
    d, files = model_files(tmp_path, MOE, seed=6)
    hub.add("owner/protorel", files)
    hub.faults["owner/protorel"] = "protorel"
    e = env(hub, tmp_path / "cache")
    code, _, err = nm(e, "info", "owner/protorel")
    assert code == 0, err
    assert hub.count("store") > 0  # the weights came from the file store's host
    assert (logits(e, "owner/protorel", tmp_path) - logits(e, d, tmp_path)).abs().max().item() == 0.0


def test_interrupted_downloads_resume(tmp_path, hub):
    d, files = model_files(tmp_path, MOE, seed=5)
    hub.add("owner/flaky", files)
    hub.faults["owner/flaky"] = "truncate"
    cache = tmp_path / "cache"
    e = env(hub, cache)
    code, _, err = nm(e, "info", "owner/flaky")
    assert code != 0 and "is truncated" in err
    partial = list((cache / "models--owner--flaky" / "blobs").glob("*.incomplete"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    have = partial[0].stat().st_size
    del hub.faults["owner/flaky"]
    code, _, err = nm(e, "info", "owner/flaky")
    assert code == 0, err
    assert [start for _, start in hub.ranges] == [have]  # resumed where it broke off
    assert not list((cache / "models--owner--flaky" / "blobs").glob("*.incomplete"))
    assert (logits(e, "owner/flaky", tmp_path) - logits(e, d, tmp_path)).abs().max().item() == 0.0


def py(e, code):
    """Runs Python code in a fresh interpreter with env `e` (huggingface_hub reads its
    settings at import)."""
    p = subprocess.run([os.sys.executable, "-c", code], env=e, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.parametrize("conf", [DENSE, MOE])
def test_push_then_python_downloads_identical_files(tmp_path, hub, conf):
    from safetensors.torch import load_file
    d, files = model_files(tmp_path, conf, seed=6)
    cache = tmp_path / "cache"
    e = dict(env(hub, cache), HF_TOKEN=TOKEN)
    code, out, err = nm(e, "push", d, "me/pushed", "--message", "first upload")
    assert code == 0, err
    assert TOKEN not in out + err
    assert hub.commits_made[-1][:2] == ("me/pushed", "first upload")
    assert hub.store_auth_seen == []
    if conf is DENSE:  # the 1.6 MB weights went through the multipart transfer
        assert any(p.startswith("/part/") for s, m, p in hub.requests if s == "store")
    pycache = tmp_path / "pycache"
    snap = py(dict(e, HF_HUB_CACHE=str(pycache)), f"""
import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
p = snapshot_download("me/pushed")
m = AutoModelForCausalLM.from_pretrained("me/pushed", trust_remote_code=True).eval()
with torch.no_grad():
    save_file({{"logits": m(torch.tensor({IDS})).logits.contiguous()}}, "{tmp_path / 'py.safetensors'}")
print(p)
""").strip().splitlines()[-1]
    p = Path(snap)
    for name, data in files.items():
        assert (p / name).read_bytes() == data, name
    card = (p / "README.md").read_text()
    assert "me/pushed" in card and "active per token" in card
    assert ("trust_remote_code=True" in card) == (conf is MOE)
    pyl = load_file(str(tmp_path / "py.safetensors"))["logits"]
    assert (pyl - logits(e, d, tmp_path)).abs().max().item() <= 1e-4
    # Pushing without a token is a clear error.
    code, _, err = nm(env(hub, cache), "push", d, "me/pushed")
    assert code != 0 and "pushing needs a token" in err


def test_python_upload_folder_loads_in_nanomoe(tmp_path, hub):
    d, files = model_files(tmp_path, MOE, seed=7)
    e = dict(env(hub, tmp_path / "cache"), HF_TOKEN=TOKEN)
    py(e, f"""
from huggingface_hub import HfApi
api = HfApi()
api.create_repo("me/fromsdk", exist_ok=True)
api.upload_folder(folder_path="{d}", repo_id="me/fromsdk")
""")
    assert (logits(e, "me/fromsdk", tmp_path) - logits(e, d, tmp_path)).abs().max().item() == 0.0

"""`nanomoe prepare` on parquet files as HF datasets writes them (pyarrow), checked with
transformers' tokenizer loaded from the written tokenizer files."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from conftest import ROOT, nanomoe_bin, run

DOCS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.",
    "  leading spaces and ünïcödé  ",
    "Third document\n\nwith a blank line.",
] * 10


@pytest.mark.parametrize("compression", ["snappy", "zstd"])
@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_parquet_documents_are_tokenized_with_separators(tmp_path, compression, tokenizer):
    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS})
    pq.write_table(table, tmp_path / "train-00000.parquet", compression=compression, row_group_size=7)
    out = tmp_path / "data"
    run("prepare", "--input", tmp_path / "train-00000.parquet", "--tokenizer", tokenizer, "--out", out, "--val-fraction", "0.1")
    tok = AutoTokenizer.from_pretrained(out)
    sep = [50256] if tokenizer == "gpt2" else tok.encode("\n", add_special_tokens=False)
    expect = []
    for d in DOCS:
        expect += tok.encode(d, add_special_tokens=False) + sep
    dtype = np.uint16
    train = np.fromfile(out / "train.bin", dtype=dtype).tolist()
    val = np.fromfile(out / "val.bin", dtype=dtype).tolist()
    assert train + val == expect
    # The last 10% of the rows (4 of 40) are the val split.
    tail = []
    for d in DOCS[36:]:
        tail += tok.encode(d, add_special_tokens=False) + sep
    assert val == tail


def test_parquet_errors(tmp_path):
    import subprocess
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "x.parquet")
    p = subprocess.run([nanomoe_bin(), "prepare", "--input", str(tmp_path / "x.parquet"), "--out", str(tmp_path / "d")],
                       capture_output=True, text=True)
    assert p.returncode != 0
    assert p.stderr.strip() == f'error: {tmp_path / "x.parquet"}: has no column "text" (columns: content); choose one with --text-column'
    assert not (tmp_path / "d").exists()
    run("prepare", "--input", tmp_path / "x.parquet", "--text-column", "content", "--out", tmp_path / "d", "--val-fraction", "0.5")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    p = subprocess.run([nanomoe_bin(), "prepare", "--input", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "e")],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "not a readable parquet file" in p.stderr

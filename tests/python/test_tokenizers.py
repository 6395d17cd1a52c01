"""Rust-written tokenizer files load in transformers' AutoTokenizer with equal ids and
exact round trips (newlines, runs of spaces, unicode)."""
import json
import random

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from conftest import ROOT, run

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def sample_text():
    """tiny-shakespeare's first 20,000 characters from ../shared; generated mixed-case text
    with punctuation when it is absent (a clone that is not beside shared/)."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text()[:20000]
    rng = random.Random(7)
    words = ["Thou", "art", "the", "king's", "men", "HEAR", "me", "speak", "what", "say'st", "we", "'re"]
    lines = (" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) + rng.choice(".,;:!?") for _ in range(800))
    return "\n".join(lines) + "\n"


TEXTS = [
    "Hello,  world!\n\n\tTabs\tand   runs of spaces   \n",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "ünïcödé — 日本語 🙂 's 're  123 4567\r\n",
    "   leading and trailing   ",
    "",
]


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_rust_tokenizer_files_load_in_autotokenizer(tmp_path, kind):
    d = tmp_path / kind
    if kind == "char":
        corpus = tmp_path / "corpus.txt"
        corpus.write_text(sample_text() + "".join(TEXTS))
        run("tokenize", "--tokenizer", "char", "--corpus", corpus, "--save", d)
    else:
        run("tokenize", "--tokenizer", "gpt2", "--save", d)
    tok = AutoTokenizer.from_pretrained(d)
    assert isinstance(tok, PreTrainedTokenizerFast)  # (named TokenizersBackend in transformers 5)
    for text in TEXTS + [sample_text()[:5000]]:
        ours = json.loads(run("tokenize", "--tokenizer", d, "--text", text))["ids"] if text else []
        theirs = tok.encode(text, add_special_tokens=False)
        assert theirs == ours, text
        assert tok.decode(theirs) == text
    if kind == "char":
        # An unseen character is <unk>, not dropped.
        ids = tok.encode("a\u2603b", add_special_tokens=False)
        assert tok.convert_ids_to_tokens(ids)[1] == "<unk>"
    else:
        assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256

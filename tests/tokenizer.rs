//! Tokenizers: GPT-2 BPE ids equal tiktoken's on all of tiny-shakespeare; char-level
//! round trips; files round trip.

use std::path::PathBuf;

use nanomoe::tokenizer::Tokenizer;

mod common;

const TRICKY: &str = "Hello,  world!\n\n\tTabs\tand   runs of spaces   \r\nünïcödé — 日本語 🙂 <|endoftext|> 's 're  123 4567\n";

#[test]
fn gpt2_ids_equal_tiktoken_on_tiny_shakespeare() {
    let (text, _) = common::sample_text();
    let ours = Tokenizer::gpt2().unwrap();
    let reference = tiktoken_rs::r50k_base().unwrap();
    let a = ours.encode(&text).unwrap();
    let b: Vec<u32> = reference.encode_ordinary(&text);
    assert_eq!(a.len(), b.len());
    assert!(a == b, "first difference at {:?}", a.iter().zip(&b).position(|(x, y)| x != y));
    assert_eq!(ours.decode(&a).unwrap(), text);
    // Ordinary text that contains the special token's spelling still tokenizes as text
    // in tiktoken's encode_ordinary; ours treats <|endoftext|> as the special token.
    let plain = TRICKY.replace("<|endoftext|>", "");
    assert_eq!(ours.encode(&plain).unwrap(), reference.encode_ordinary(&plain));
    assert_eq!(ours.decode(&ours.encode(TRICKY).unwrap()).unwrap(), TRICKY);
    assert_eq!(ours.vocab_size(), 50257);
    assert_eq!(ours.eos_token_id(), Some(50256));
    assert_eq!(ours.encode("<|endoftext|>").unwrap(), vec![50256]);
}

#[test]
fn char_level_matches_nanogpt_and_keeps_whitespace() {
    let t = Tokenizer::char_level("hello world\n").unwrap();
    // sorted unique characters: '\n', ' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w'; <unk> last
    assert_eq!(t.encode("hello world\n").unwrap(), vec![4, 3, 5, 5, 6, 1, 8, 6, 7, 5, 2, 0]);
    assert_eq!(t.vocab_size(), 10);
    assert_eq!(t.decode(&t.encode("  held\n\nold  ").unwrap()).unwrap(), "  held\n\nold  ");
    // Unseen characters become <unk> instead of disappearing.
    assert_eq!(t.encode("hex").unwrap(), vec![4, 3, 9]);
    assert_eq!(t.decode(&[4, 9]).unwrap(), "h<unk>");
    let all = Tokenizer::char_level(TRICKY).unwrap();
    assert_eq!(all.decode(&all.encode(TRICKY).unwrap()).unwrap(), TRICKY);
    assert!(Tokenizer::char_level("").is_err());
}

#[test]
fn tokenizer_files_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, t) in [("char", Tokenizer::char_level(TRICKY).unwrap()), ("gpt2", Tokenizer::gpt2().unwrap())] {
        let d = tmp.path().join(name);
        t.save_pretrained(&d, Some(128)).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("tokenizer_config.json")).unwrap()).unwrap();
        assert_eq!(cfg["tokenizer_class"], "PreTrainedTokenizerFast");
        let back = Tokenizer::from_dir(&d).unwrap();
        assert_eq!(back.encode(TRICKY).unwrap(), t.encode(TRICKY).unwrap());
        assert_eq!(back.eos_token, t.eos_token);
        assert_eq!(back.unk_token, t.unk_token);
    }
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, "{\"model\": 3}").unwrap();
    let e = Tokenizer::from_file(&bad).err().unwrap().to_string();
    assert!(e.starts_with(&format!("{}: not a valid tokenizer.json", bad.display())), "{e}");
}

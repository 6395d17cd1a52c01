//! Tokenizers: GPT-2 BPE ids equal tiktoken's on all of tiny-shakespeare; char-level
//! round trips; files round trip.


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

#[test]
fn malformed_tokenizer_files_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let base: serde_json::Value = serde_json::from_str(&Tokenizer::char_level("abc").unwrap().to_json().unwrap()).unwrap();
    let cases: Vec<(&str, serde_json::Value)> = vec![
        ("/decoder", serde_json::json!(5)),
        ("/decoder", serde_json::json!({"type": 5})),
        ("/decoder", serde_json::json!({"type": "Sequence", "decoders": 5})),
        ("/decoder", serde_json::json!({"type": "Replace", "pattern": {"Regex": "("}, "content": ""})),
        ("/normalizer", serde_json::json!({"type": "Precompiled", "precompiled_charsmap": 5})),
        ("/normalizer", serde_json::json!({"type": "Lowercase", "x": [1, 2]})),
        ("/pre_tokenizer", serde_json::json!({"type": "Split", "pattern": {"Regex": "(("}, "behavior": "Isolated", "invert": false})),
        ("/model/vocab/a", serde_json::json!(1_000_000_000u64)),
        ("/model/vocab/a", serde_json::json!(-1)),
        ("/model", serde_json::json!(null)),
    ];
    for (pointer, value) in cases {
        let mut v = base.clone();
        *v.pointer_mut(pointer).unwrap_or_else(|| panic!("{pointer}")) = value.clone();
        let p = tmp.path().join("tokenizer.json");
        std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
        // Reading, encoding, decoding and saving never panic; what fails names the file.
        match Tokenizer::from_file(&p) {
            Err(e) => assert!(e.to_string().starts_with(&format!("{}: not a valid tokenizer.json: ", p.display())), "{pointer}={value}: {e}"),
            Ok(t) => {
                let _ = t.encode("abc");
                let _ = t.decode(&[0, 1, 2, 3]);
                let _ = t.to_json();
            }
        }
    }
    // The tokenizers library panics on this one (an `expect` in its Precompiled normalizer).
    let mut v = base.clone();
    *v.pointer_mut("/normalizer").unwrap() = serde_json::json!({"type": "Precompiled", "precompiled_charsmap": 5});
    std::fs::write(tmp.path().join("tokenizer.json"), serde_json::to_string(&v).unwrap()).unwrap();
    let e = Tokenizer::from_file(&tmp.path().join("tokenizer.json")).err().unwrap().to_string();
    assert!(e.contains("not a valid tokenizer.json: the tokenizers library failed on it (Precompiled: "), "{e}");
    let mut v = base.clone();
    *v.pointer_mut("/model/vocab/a").unwrap() = serde_json::json!(1_000_000_000u64);
    std::fs::write(tmp.path().join("tokenizer.json"), serde_json::to_string(&v).unwrap()).unwrap();
    assert_eq!(
        Tokenizer::from_file(&tmp.path().join("tokenizer.json")).err().unwrap().to_string(),
        format!("{}: not a valid tokenizer.json: token id 1000000000 is out of range (ids must be integers below 16777216)", tmp.path().join("tokenizer.json").display())
    );
}

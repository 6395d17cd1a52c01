//! Helpers shared by integration tests.

use std::path::PathBuf;

/// The Python of ./scripts/test's environment (torch, transformers): NANOMOE_PYTHON, else
/// ~/.cache/nanomoe/venv-v2.
#[allow(dead_code)]
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("NANOMOE_PYTHON") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/nanomoe/venv-v2/bin/python");
    assert!(p.is_file(), "no Python environment: run ./scripts/test once, or set NANOMOE_PYTHON");
    p
}

/// Text for tokenizer and data tests: tiny-shakespeare from ../shared (or NANOMOE_SHAKESPEARE)
/// when it is there, otherwise 40,000 lines of nanomoe's built-in grammar corpus plus a line of
/// Unicode, tabs and CRLF, so the tests also run in a clone that is not beside shared/.
/// Returns the text and whether it is tiny-shakespeare.
#[allow(dead_code)]
pub fn sample_text() -> (String, bool) {
    let p = std::env::var_os("NANOMOE_SHAKESPEARE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/tinyshakespeare.txt"));
    match std::fs::read_to_string(&p) {
        Ok(t) => (t, true),
        Err(e) => {
            eprintln!("{} not readable ({e}): using generated text instead of tiny-shakespeare", p.display());
            let (train, val) = nanomoe::train::grammar::corpus(40_000, 7);
            (format!("{train}{val}Ünïcödé — 日本語 🙂\tTabs  and   runs\r\n's 're 123 4567\n"), false)
        }
    }
}

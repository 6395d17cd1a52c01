//! Helpers shared by integration tests.

use std::path::PathBuf;

/// The Python of ./scripts/test's environment (torch, transformers): NANOMOE_PYTHON, else
/// ~/.cache/nanomoe/venv-v1.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("NANOMOE_PYTHON") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/nanomoe/venv-v1/bin/python");
    assert!(p.is_file(), "no Python environment: run ./scripts/test once, or set NANOMOE_PYTHON");
    p
}

//! One error type for the library. Every message names the problem and, where
//! there is one, the file, tensor or field at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid config: {0}")]
    Config(String),

    #[error("invalid input: {0}")]
    Input(String),

    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },

    #[error("checkpoint: {0}")]
    Checkpoint(String),

    #[error("unknown model_type {found:?}; supported model types: {supported}")]
    UnknownModelType { found: String, supported: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::File { path: path.into(), msg: msg.to_string() }
    }
}

/// Shorthand for `Error::Input` with a formatted message.
macro_rules! input_err {
    ($($arg:tt)*) => { $crate::error::Error::Input(format!($($arg)*)) };
}
pub(crate) use input_err;

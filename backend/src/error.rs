//! One error type for the library. Each variant says what kind of failure it is, so the CLI can
//! print one line and the HTTP layer can choose a status code.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller asked for something invalid (out-of-range layer, NaN clamp, empty prompt...).
    #[error("{0}")]
    BadInput(String),
    /// The input is well formed but larger than the documented limits (prompt too long...).
    #[error("{0}")]
    TooLarge(String),
    /// A string that had to be a single token is not.
    #[error("{0}")]
    UnknownToken(String),
    /// The model's output for this input is not finite (an overflow, e.g. from huge clamps in f16).
    #[error("{0}")]
    NonFinite(String),
    /// The request needs more computation than the server allows per request.
    #[error("{0}")]
    OverBudget(String),
    /// The client went away; the work was stopped.
    #[error("cancelled: the client went away")]
    Cancelled,
    /// A model file that cannot be used: truncated, not GGUF, missing tensors, unsupported type.
    #[error("model {path}: {message}")]
    Model { path: PathBuf, message: String },
    /// A downloaded file whose sha256 is not the pinned one.
    #[error("{path}: sha256 is {actual}, expected {expected}; the file is corrupt or not the pinned release")]
    Checksum { path: PathBuf, expected: String, actual: String },
    /// A cache file that is stale, truncated or corrupt; callers rebuild it.
    #[error("cache {path}: {message}")]
    Cache { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("fetching the model: {0}")]
    Fetch(String),
    #[error("tensor computation: {}", first_line(.0))]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub fn model(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::Model { path: path.into(), message: first_line(message) }
    }
    pub fn bad(message: impl Into<String>) -> Self {
        Error::BadInput(message.into())
    }
}

/// candle appends a backtrace to its errors when RUST_BACKTRACE is set; users get one line.
fn first_line(e: impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().trim_end().to_owned()
}

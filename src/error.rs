//! The engine's one error type. Every variant names the file, tensor or field at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    /// A file that is not a usable safetensors file (or is a pickle we refuse to open).
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },

    /// A tensor that is missing, mis-shaped, or holds NaN/Inf.
    #[error("{file}: tensor '{tensor}': {message}")]
    Tensor { file: String, tensor: String, message: String },

    /// A model folder or config that does not describe a loadable model.
    #[error("{path}: {message}")]
    Model { path: PathBuf, message: String },

    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("scheduler: {0}")]
    Scheduler(String),

    /// A user-supplied argument (CLI flag or API parameter) with a bad value.
    #[error("{0}")]
    Argument(String),

    #[error("hugging face hub: {0}")]
    Hub(String),

    /// Our own state or invariant failed (a released model, an encoder, a numeric routine), not
    /// the request: the API answers it with a 500 where an `Argument` is a 422.
    #[error("{0}")]
    Internal(String),

    #[error("cancelled")]
    Cancelled,

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
    pub fn model(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Model { path: path.into(), message: message.into() }
    }
}

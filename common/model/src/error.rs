//! The error type of quill's shared library.

use std::path::PathBuf;

/// Anything that can go wrong while loading, running or saving a model or tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A JSON file is not valid JSON.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        source: serde_json::Error,
    },
    /// A model config field is missing or has a bad value.
    #[error("model config field `{field}`: {reason}")]
    Config {
        /// The field's name as it appears in `config.json`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the architecture needs is not in the checkpoint.
    #[error("checkpoint {path}: missing tensor `{name}`")]
    MissingTensor {
        /// Where it was looked for.
        path: PathBuf,
        /// The Hugging Face tensor name.
        name: String,
    },
    /// A checkpoint tensor has a shape the config does not allow.
    #[error("checkpoint tensor `{name}` has shape {actual:?}, the config needs {expected:?}")]
    ShapeMismatch {
        /// The Hugging Face tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<i64>,
        /// The shape in the file.
        actual: Vec<i64>,
    },
    /// A safetensors file is corrupt or holds an unsupported dtype.
    #[error("safetensors file {path}: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The tokenizer could not be loaded or failed to encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A prompt leaves no room for a single new token in the model's context.
    #[error(
        "prompt has {len} tokens but the model's context holds {max} (max_position_embeddings)"
    )]
    PromptTooLong {
        /// Prompt length in tokens.
        len: usize,
        /// The model's context length.
        max: usize,
    },
    /// A token id is outside the vocabulary.
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfVocab {
        /// The offending id.
        id: i64,
        /// The vocabulary size.
        vocab: i64,
    },
    /// [`crate::LayerCheckpoints::backward`] was called before a gradient reached the
    /// checkpointed hidden states.
    #[error("activation checkpointing: no gradient reached the hidden states")]
    NoGradient,
    /// A device or dtype string could not be used.
    #[error("{0}")]
    Device(String),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Config`] for `field`.
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

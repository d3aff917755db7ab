//! Hugging Face `tokenizer.json` tokenizers, through the `tokenizers` crate.

use crate::error::{Error, Result};
use std::path::Path;

/// A tokenizer that maps text to token ids and back; special tokens are kept in decoded
/// text so that stop strings such as `</answer>` can be seen.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner`'s vocabulary size with added tokens; the `tokenizers` crate builds the
    /// whole vocabulary map to count it, too slow for every sampled token.
    vocab_size: usize,
}

impl Tokenizer {
    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Tokenizer::wrap(inner))
    }

    /// Parses the JSON text of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        let inner = json
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Tokenizer::wrap(inner))
    }

    fn wrap(inner: tokenizers::Tokenizer) -> Self {
        let vocab_size = inner.get_vocab_size(true);
        Tokenizer { inner, vocab_size }
    }

    /// Token ids of `text`, without adding any special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let size = self.vocab_size() as i64;
        let ids = ids
            .iter()
            .map(|&id| {
                u32::try_from(id)
                    .ok()
                    .filter(|_| id < size)
                    .ok_or(Error::TokenOutOfVocab { id, vocab: size })
            })
            .collect::<Result<Vec<u32>>>()?;
        self.inner
            .decode(&ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The text of generated ids, as `transformers` decodes them: ids the tokenizer does
    /// not know are skipped (a model's vocabulary is often padded beyond the
    /// tokenizer's, and an untrained model samples the padding), and invalid UTF-8 is
    /// replaced, so one stray id never costs a sample its whole text.
    pub fn decode_generated(&self, ids: &[i64]) -> String {
        let size = self.vocab_size();
        let known: Vec<u32> = ids
            .iter()
            .filter_map(|&id| u32::try_from(id).ok().filter(|&i| (i as usize) < size))
            .collect();
        self.inner.decode(&known, false).unwrap_or_default()
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

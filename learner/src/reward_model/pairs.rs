//! Preference pairs from JSONL: one object per line with a prompt, a chosen and a rejected
//! response (field names configurable), and the split into training and held-out pairs.

use super::{Result, RmError};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::path::Path;

/// One preference: `chosen` is the better answer to `prompt` than `rejected`.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    /// The question.
    pub prompt: String,
    /// The preferred response.
    pub chosen: String,
    /// The other response.
    pub rejected: String,
}

impl PreferencePair {
    /// The text the reward model scores for `response`, as the quality reward builds it.
    pub fn text(&self, response: &str) -> String {
        format!("{}\n\n{}", self.prompt, response)
    }
}

/// The names of the three fields in a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairFields {
    /// The prompt field.
    pub prompt: String,
    /// The chosen-response field.
    pub chosen: String,
    /// The rejected-response field.
    pub rejected: String,
}

impl Default for PairFields {
    fn default() -> Self {
        PairFields {
            prompt: "prompt".into(),
            chosen: "chosen".into(),
            rejected: "rejected".into(),
        }
    }
}

/// Reads every pair of a JSONL file (blank lines skipped); errors name the line and field.
pub fn load_pairs(path: &Path, fields: &PairFields) -> Result<Vec<PreferencePair>> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| RmError::Io {
        path: shown.clone(),
        source,
    })?;
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record_error = |reason: String| RmError::Record {
            path: shown.clone(),
            line: i + 1,
            reason,
        };
        let value: Value =
            serde_json::from_str(line).map_err(|e| record_error(format!("invalid JSON: {e}")))?;
        if !value.is_object() {
            return Err(record_error("must be a JSON object".into()));
        }
        let field = |name: &str, may_be_empty: bool| match value.get(name) {
            Some(Value::String(s)) if may_be_empty || !s.trim().is_empty() => Ok(s.clone()),
            Some(Value::String(_)) => Err(record_error(format!("field `{name}` is empty"))),
            Some(_) => Err(record_error(format!("field `{name}` must be a string"))),
            None => Err(record_error(format!("missing field `{name}`"))),
        };
        pairs.push(PreferencePair {
            prompt: field(&fields.prompt, true)?,
            chosen: field(&fields.chosen, false)?,
            rejected: field(&fields.rejected, false)?,
        });
    }
    if pairs.is_empty() {
        return Err(RmError::Empty(shown));
    }
    Ok(pairs)
}

/// Shuffles `pairs` with `seed` and holds out `fraction` of them (at least one when there
/// are two or more, never all): returns (training, held-out).
pub fn split_pairs(
    mut pairs: Vec<PreferencePair>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<PreferencePair>, Vec<PreferencePair>)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(RmError::config(
            "--eval-fraction",
            format!("must be in [0, 1), got {fraction}"),
        ));
    }
    pairs.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut held = (pairs.len() as f64 * fraction).round() as usize;
    if fraction > 0.0 && pairs.len() >= 2 {
        held = held.clamp(1, pairs.len() - 1);
    }
    let eval = pairs.split_off(pairs.len() - held);
    Ok((pairs, eval))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, fields: &PairFields) -> Result<Vec<PreferencePair>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pairs.jsonl");
        std::fs::write(&path, text).unwrap();
        load_pairs(&path, fields)
    }

    #[test]
    fn reads_pairs_with_configured_fields() {
        let fields = PairFields {
            prompt: "question".into(),
            chosen: "good".into(),
            rejected: "bad".into(),
        };
        let pairs = load(
            "{\"question\": \"q\", \"good\": \"a\", \"bad\": \"b\", \"extra\": 1}\n\n",
            &fields,
        )
        .unwrap();
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs[0].text(&pairs[0].chosen), "q\n\na");
        assert_eq!(pairs[0].rejected, "b");
    }

    #[test]
    fn bad_input_names_the_line_and_field() {
        let f = PairFields::default();
        let err = |text: &str| load(text, &f).unwrap_err().to_string();
        let good = r#"{"prompt": "q", "chosen": "a", "rejected": "b"}"#;
        let e = err(&format!(
            "{good}\n{{\"prompt\": \"q\", \"chosen\": \"a\"}}\n"
        ));
        assert!(e.ends_with("line 2: missing field `rejected`"), "{e}");
        let e = err(&format!("{good}\n{good}\n{{oops\n"));
        assert!(e.contains("line 3: invalid JSON"), "{e}");
        let e = err(r#"{"prompt": "q", "chosen": 5, "rejected": "b"}"#);
        assert!(e.contains("line 1: field `chosen` must be a string"), "{e}");
        let e = err(r#"{"prompt": "q", "chosen": " ", "rejected": "b"}"#);
        assert!(e.contains("field `chosen` is empty"), "{e}");
        let e = err("[1, 2]\n");
        assert!(e.contains("line 1: must be a JSON object"), "{e}");
        assert!(err("\n \n").ends_with("holds no pairs"));
        let missing = load_pairs(Path::new("/no/pairs.jsonl"), &f)
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with("preference file /no/pairs.jsonl"),
            "{missing}"
        );
    }

    #[test]
    fn the_split_is_seeded_and_never_empty() {
        let pairs: Vec<_> = (0..10)
            .map(|i| PreferencePair {
                prompt: i.to_string(),
                chosen: "a".into(),
                rejected: "b".into(),
            })
            .collect();
        let (train, eval) = split_pairs(pairs.clone(), 0.2, 3).unwrap();
        assert_eq!((train.len(), eval.len()), (8, 2));
        assert_eq!(split_pairs(pairs.clone(), 0.2, 3).unwrap().1, eval);
        assert_eq!(split_pairs(pairs.clone(), 0.01, 3).unwrap().1.len(), 1);
        assert_eq!(split_pairs(pairs.clone(), 0.0, 3).unwrap().1.len(), 0);
        let e = split_pairs(pairs, 1.0, 3).unwrap_err().to_string();
        assert!(e.starts_with("--eval-fraction"), "{e}");
    }
}

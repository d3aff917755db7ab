//! Stop-string detection on the tail of a sample's tokens.

use quill_model::Tokenizer;

/// Watches generated tokens for any of a set of stop strings.
pub struct StopStrings {
    strings: Vec<String>,
    window: usize,
}

impl StopStrings {
    /// A detector for `strings`.
    pub fn new(strings: &[String]) -> Self {
        let longest = strings.iter().map(String::len).max().unwrap_or(0);
        StopStrings {
            strings: strings.to_vec(),
            // Every token decodes to at least one byte, so this many tokens cover the
            // longest string plus a few bytes of a split UTF-8 character.
            window: longest + 4,
        }
    }

    /// The stop string that the last token of `tokens` completed, if any.
    pub fn completed_by_last(&self, tokenizer: &Tokenizer, tokens: &[i64]) -> Option<String> {
        if self.strings.is_empty() || tokens.is_empty() {
            return None;
        }
        let start = tokens.len().saturating_sub(self.window);
        let text = tokenizer.decode_generated(&tokens[start..]);
        let candidates: Vec<&String> = self
            .strings
            .iter()
            .filter(|s| text.contains(s.as_str()))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let before = tokenizer.decode_generated(&tokens[start..tokens.len() - 1]);
        candidates
            .into_iter()
            .find(|s| !before.contains(s.as_str()))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quill_model::default_model;

    #[test]
    fn detects_a_string_completed_by_the_last_token() {
        let tok = Tokenizer::from_json(&default_model::tokenizer_json()).unwrap();
        let stops = StopStrings::new(&["</answer>".to_owned(), "END".to_owned()]);
        let ids = tok.encode("<answer> some text here </answer>").unwrap();
        assert_eq!(
            stops.completed_by_last(&tok, &ids).as_deref(),
            Some("</answer>")
        );
        assert_eq!(stops.completed_by_last(&tok, &ids[..ids.len() - 1]), None);
        let ids = tok.encode("the END").unwrap();
        assert_eq!(stops.completed_by_last(&tok, &ids).as_deref(), Some("END"));
        let ids = tok.encode("the EN").unwrap();
        assert_eq!(stops.completed_by_last(&tok, &ids), None);
        // An id beyond the tokenizer's vocabulary (the model's padding) hides nothing.
        let padding = tok.vocab_size() as i64 + 3;
        let mut ids = tok.encode("<answer> text").unwrap();
        ids.push(padding);
        ids.extend(tok.encode(" more </answer>").unwrap());
        assert_eq!(
            stops.completed_by_last(&tok, &ids).as_deref(),
            Some("</answer>")
        );
    }
}

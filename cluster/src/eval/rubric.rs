//! Judge prompt templates: read from a file (or the shipped example), checked to hold
//! each slot exactly once, and filled in one pass so that an answer containing a slot
//! name is not filled again.

use anyhow::{bail, Context};
use std::path::Path;

/// A checked template.
#[derive(Debug, Clone)]
pub struct Rubric {
    text: String,
    slots: &'static [&'static str],
}

impl Rubric {
    /// The template in `path`, or `default` when none is given; `flag` names it in
    /// errors. Each of `slots` must occur exactly once.
    pub fn load(
        path: Option<&Path>,
        default: &str,
        slots: &'static [&'static str],
        flag: &str,
    ) -> anyhow::Result<Self> {
        let (text, source) = match path {
            Some(path) => (
                std::fs::read_to_string(path)
                    .with_context(|| format!("{flag} {}", path.display()))?,
                format!("{flag} {}", path.display()),
            ),
            None => (default.to_owned(), format!("the default {flag}")),
        };
        for slot in slots {
            let count = text.matches(slot).count();
            if count != 1 {
                bail!("{source} must contain {slot} exactly once (found {count})");
            }
        }
        Ok(Rubric { text, slots })
    }

    /// The template as read.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The template with each slot replaced by its value (`values` in slot order).
    pub fn fill(&self, values: &[&str]) -> String {
        debug_assert_eq!(values.len(), self.slots.len());
        let mut out =
            String::with_capacity(self.text.len() + values.iter().map(|v| v.len()).sum::<usize>());
        let mut rest = self.text.as_str();
        while let Some((at, k)) = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(k, slot)| rest.find(slot).map(|at| (at, k)))
            .min()
        {
            out.push_str(&rest[..at]);
            out.push_str(values[k]);
            rest = &rest[at + self.slots[k].len()..];
        }
        out.push_str(rest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOTS: &[&str] = &["{question}", "{answer_a}", "{answer_b}"];

    #[test]
    fn slots_are_filled_once_in_one_pass() {
        let rubric = Rubric::load(
            None,
            "B={answer_b} Q={question} A={answer_a}.",
            SLOTS,
            "--x",
        )
        .unwrap();
        assert_eq!(
            rubric.fill(&["q", "{answer_b}", "b"]),
            "B=b Q=q A={answer_b}."
        );
    }

    #[test]
    fn a_missing_or_doubled_slot_names_the_flag() {
        let e = Rubric::load(None, "{question} {answer_a}", SLOTS, "--pairwise-template")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--pairwise-template") && e.contains("{answer_b}"),
            "{e}"
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "{question}{question}{answer_a}{answer_b}").unwrap();
        let e = Rubric::load(Some(file.path()), "", SLOTS, "--pairwise-template")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("found 2") && e.contains(&file.path().display().to_string()),
            "{e}"
        );
        let e = format!(
            "{:#}",
            Rubric::load(
                Some(Path::new("/no/rubric")),
                "",
                SLOTS,
                "--critic-template"
            )
            .unwrap_err()
        );
        assert!(e.contains("--critic-template /no/rubric"), "{e}");
    }
}

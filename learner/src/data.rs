//! The prompt data the learner owns: JSONL records (Arena-Write's `question` + `length`, or
//! a plain `prompt` + `length_range`), or the embedded prompts of the default job, served
//! in seeded shuffled epochs from a cursor that checkpoints can save and restore.

use crate::ranges::{Prediction, PredictorConfig, RangeError, RangePredictor, DEFAULT_TEMPLATE};
use quill_config::job::{DataSection, RangePredictorSection};
use quill_reward::{parse_length_range, LengthRange};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// What is wrong with the prompt data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("prompt file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A record is unusable.
    #[error("prompt file {path}, line {line}: {reason}")]
    Record {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// No records at all.
    #[error("prompt file {0} holds no prompts")]
    Empty(String),
    /// The range predictor is misconfigured.
    #[error("{0}")]
    Predictor(String),
}

/// How a prompt is turned into model input.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptText {
    /// A question, to be wrapped in the job's template.
    Question(String),
    /// A ready-made prompt, used as written.
    Raw(String),
}

/// One prompt with its target word range.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// Index in the data (stable across epochs).
    pub id: u64,
    /// The text.
    pub text: PromptText,
    /// Target answer length in words.
    pub range: LengthRange,
}

impl Prompt {
    /// The question or raw prompt text.
    pub fn as_str(&self) -> &str {
        match &self.text {
            PromptText::Question(s) | PromptText::Raw(s) => s,
        }
    }
}

/// Where the dataset stands: epoch and position inside it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Completed passes.
    pub epoch: u32,
    /// Next index into this epoch's order.
    pub position: usize,
}

/// The prompts and the order they are served in.
pub struct Dataset {
    prompts: Vec<Prompt>,
    order: Vec<usize>,
    cursor: Cursor,
    seed: u64,
    shuffle: bool,
    epochs: u32,
}

const KINDS: [&str; 4] = ["story", "poem", "letter", "essay"];
const TOPICS: [&str; 6] = [
    "the sea",
    "a city at night",
    "an old tree",
    "a long journey",
    "the first snow",
    "a lost letter",
];
const RANGES: [(u32, u32); 4] = [(10, 20), (15, 30), (20, 40), (30, 50)];

/// The embedded prompts of the default job: short pieces with explicit word ranges.
pub fn default_prompts() -> Vec<Prompt> {
    let mut out = Vec::new();
    for (k, kind) in KINDS.iter().enumerate() {
        for (t, topic) in TOPICS.iter().enumerate() {
            let (lo, hi) = RANGES[(k + t) % RANGES.len()];
            out.push(Prompt {
                id: out.len() as u64,
                text: PromptText::Question(format!(
                    "Write a {kind} about {topic} in {lo} to {hi} words."
                )),
                range: LengthRange::new(lo, hi).expect("valid built-in range"),
            });
        }
    }
    out
}

/// Reads prompts as the data section says. A record with no range of its own and none
/// stated in its text gets one from `data.range_predictor` when it is set (prompts it
/// finds no sensible range for are left out and counted in the log); without it, such a
/// record is an error.
pub fn load_prompts(section: &DataSection) -> Result<Vec<Prompt>, DataError> {
    if section.path == "default" {
        return Ok(default_prompts());
    }
    let path = Path::new(&section.path);
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: section.path.clone(),
        source,
    })?;
    let record_error = |line: usize, reason: String| DataError::Record {
        path: section.path.clone(),
        line,
        reason,
    };
    let mut parsed = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .map_err(|e| record_error(i + 1, format!("invalid JSON: {e}")))?;
        let record = parse_record(&value, section).map_err(|e| record_error(i + 1, e))?;
        parsed.push((i + 1, record));
    }
    let unranged: Vec<(usize, String)> = parsed
        .iter()
        .filter(|(_, (_, range))| range.is_none())
        .map(|(line, (text, _))| (*line, text_of(text).to_owned()))
        .collect();
    let mut predicted = std::collections::HashMap::new();
    if let Some(&(line, _)) = unranged.first() {
        let Some(config) = &section.range_predictor else {
            return Err(record_error(
                line,
                format!(
                    "no target length: give `{}`, `{}`, state it in the text, or set \
                     [data.range_predictor]",
                    section.range_field, section.length_field
                ),
            ));
        };
        let predictor = range_predictor(config)?;
        let questions: Vec<String> = unranged.iter().map(|(_, q)| q.clone()).collect();
        let mut skipped = 0;
        for ((line, _), result) in unranged.iter().zip(predictor.predict_blocking(&questions)) {
            match result {
                Ok(Prediction::Range(range)) => {
                    predicted.insert(*line, range);
                }
                Ok(Prediction::NoRange) => skipped += 1,
                Err(e) if e.is_endpoint_failure() => {
                    return Err(record_error(*line, e.to_string()))
                }
                Err(e) => {
                    tracing::warn!("prompt file {}, line {line}: left out: {e}", section.path);
                    skipped += 1;
                }
            }
        }
        tracing::info!(
            "range predictor: {} of {} prompts without a stated length got a range, {skipped} left out",
            predicted.len(),
            unranged.len()
        );
    }
    let prompts: Vec<Prompt> = parsed
        .into_iter()
        .filter_map(|(line, (text, range))| {
            Some((text, range.or_else(|| predicted.get(&line).copied())?))
        })
        .enumerate()
        .map(|(id, (text, range))| Prompt {
            id: id as u64,
            text,
            range,
        })
        .collect();
    if prompts.is_empty() {
        return Err(DataError::Empty(section.path.clone()));
    }
    Ok(prompts)
}

/// The predictor a job's `[data.range_predictor]` describes.
fn range_predictor(config: &RangePredictorSection) -> Result<RangePredictor, DataError> {
    let field_error = |field: &str, reason: String| {
        DataError::Predictor(format!("data.range_predictor.{field}: {reason}"))
    };
    let template = if config.template.is_empty() {
        DEFAULT_TEMPLATE.to_owned()
    } else {
        std::fs::read_to_string(&config.template)
            .map_err(|e| field_error("template", format!("{}: {e}", config.template)))?
    };
    let api_key = if config.api_key_env.is_empty() {
        None
    } else {
        Some(std::env::var(&config.api_key_env).map_err(|_| {
            field_error(
                "api_key_env",
                format!("the variable {} is not set", config.api_key_env),
            )
        })?)
    };
    RangePredictor::new(PredictorConfig {
        template,
        timeout: Duration::from_secs_f64(config.timeout_s),
        retries: config.retries,
        api_key,
        ..PredictorConfig::new(&config.url, &config.model)
    })
    .map_err(|e| match e {
        RangeError::Config { field, reason } => field_error(field, reason),
        other => DataError::Predictor(other.to_string()),
    })
}

fn text_of(text: &PromptText) -> &str {
    match text {
        PromptText::Question(s) | PromptText::Raw(s) => s,
    }
}

/// A record's text and its range, when it gives or states one.
fn parse_record(
    value: &Value,
    section: &DataSection,
) -> Result<(PromptText, Option<LengthRange>), String> {
    let field = |name: &str| value.get(name).filter(|v| !v.is_null());
    let text = match (field(&section.question_field), field(&section.prompt_field)) {
        (Some(Value::String(q)), _) if !q.trim().is_empty() => PromptText::Question(q.clone()),
        (_, Some(Value::String(p))) if !p.trim().is_empty() => PromptText::Raw(p.clone()),
        _ => {
            return Err(format!(
                "needs a non-empty string `{}` or `{}`",
                section.question_field, section.prompt_field
            ))
        }
    };
    let range = if let Some(range) = field(&section.range_field) {
        let pair = range
            .as_array()
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| {
                format!(
                    "`{}` must be a [lo, hi] pair of word counts",
                    section.range_field
                )
            })?;
        let (lo, hi) = (to_u32(pair.0)?, to_u32(pair.1)?);
        Some(LengthRange::new(lo, hi).map_err(|e| format!("`{}`: {e}", section.range_field))?)
    } else if let Some(length) = field(&section.length_field) {
        let words = length
            .as_u64()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("`{}` must be a positive word count", section.length_field))?;
        let words = to_u32(words)?;
        Some(
            LengthRange::new(words - words / 10, words + words / 10)
                .map_err(|e| format!("`{}`: {e}", section.length_field))?,
        )
    } else {
        parse_length_range(text_of(&text))
    };
    Ok((text, range))
}

fn to_u32(n: u64) -> Result<u32, String> {
    u32::try_from(n).map_err(|_| format!("word count {n} is too large"))
}

impl Dataset {
    /// A dataset over `prompts`, shuffled per epoch with `seed` when `shuffle` is set,
    /// serving `epochs` passes (0 = no limit).
    pub fn new(prompts: Vec<Prompt>, seed: u64, shuffle: bool, epochs: u32) -> Self {
        let mut dataset = Dataset {
            order: Vec::new(),
            prompts,
            cursor: Cursor::default(),
            seed,
            shuffle,
            epochs,
        };
        dataset.order = dataset.order_of(0);
        dataset
    }

    fn order_of(&self, epoch: u32) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.prompts.len()).collect();
        if self.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ (u64::from(epoch) << 32));
            order.shuffle(&mut rng);
        }
        order
    }

    /// Number of prompts.
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    /// Whether there are no prompts.
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// The prompt with this id.
    pub fn get(&self, id: u64) -> Option<&Prompt> {
        self.prompts.get(id as usize)
    }

    /// The next prompt, or `None` once every epoch is served.
    pub fn next_prompt(&mut self) -> Option<Prompt> {
        if self.cursor.position == self.order.len() {
            if self.epochs != 0 && self.cursor.epoch + 1 >= self.epochs {
                return None;
            }
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                position: 0,
            };
            self.order = self.order_of(self.cursor.epoch);
        }
        let index = self.order[self.cursor.position];
        self.cursor.position += 1;
        Some(self.prompts[index].clone())
    }

    /// Where the dataset stands.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Continues from a saved cursor.
    pub fn restore(&mut self, cursor: Cursor) {
        self.order = self.order_of(cursor.epoch);
        self.cursor = Cursor {
            epoch: cursor.epoch,
            position: cursor.position.min(self.order.len()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(path: &Path) -> DataSection {
        DataSection {
            path: path.display().to_string(),
            ..DataSection::default()
        }
    }

    fn load(lines: &str) -> Result<Vec<Prompt>, DataError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(&path, lines).unwrap();
        load_prompts(&section(&path))
    }

    #[test]
    fn reads_arena_write_and_plain_records() {
        let prompts = load(concat!(
            r#"{"idx": 3, "question": "Write about tides.", "type": "essay", "length": 2000, "baseline_response": "..."}"#,
            "\n\n",
            r#"{"prompt": "<raw> text", "length_range": [300, 500]}"#,
            "\n",
            r#"{"question": "Write a story of at least 1,000 words."}"#,
        ))
        .unwrap();
        assert_eq!(prompts.len(), 3);
        assert_eq!(
            prompts[0].text,
            PromptText::Question("Write about tides.".into())
        );
        assert_eq!((prompts[0].range.lo(), prompts[0].range.hi()), (1800, 2200));
        assert_eq!(prompts[1].text, PromptText::Raw("<raw> text".into()));
        assert_eq!((prompts[1].range.lo(), prompts[1].range.hi()), (300, 500));
        assert_eq!((prompts[2].range.lo(), prompts[2].range.hi()), (1000, 1100));
        assert_eq!(prompts[2].id, 2);
    }

    #[test]
    fn bad_records_name_their_line() {
        let err = load("{\"question\": \"a 100-word poem\"}\n{oops\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2: invalid JSON"), "{err}");
        let err = load("{\"question\": \"no length here\"}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1: no target length"), "{err}");
        assert!(err.contains("[data.range_predictor]"), "{err}");
        let err = load("{\"question\": \"x\", \"length_range\": [500, 100]}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1: `length_range`"), "{err}");
        let err = load("{\"length\": 100}\n").unwrap_err().to_string();
        assert!(
            err.contains("needs a non-empty string `question` or `prompt`"),
            "{err}"
        );
        assert!(matches!(load("\n\n"), Err(DataError::Empty(_))));
        let err = load_prompts(&section(Path::new("/no/such.jsonl")))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("prompt file /no/such.jsonl"), "{err}");
    }

    #[test]
    fn prompts_without_a_length_get_a_predicted_range_or_are_left_out() {
        use crate::ranges::tests::{by_question, Scripted};
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let server = runtime.block_on(Scripted::start(by_question));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(
            &path,
            concat!(
                "{\"question\": \"Write a grocery list.\"}\n",
                "{\"question\": \"Write a poem about rain.\"}\n",
                "{\"question\": \"Write a riddle.\"}\n",
                "{\"question\": \"写一篇两千字的文章\"}\n",
            ),
        )
        .unwrap();
        let with_predictor = |url: &str| DataSection {
            range_predictor: Some(RangePredictorSection {
                url: url.to_owned(),
                timeout_s: 1.0,
                retries: 1,
                ..RangePredictorSection::default()
            }),
            ..section(&path)
        };
        let prompts = load_prompts(&with_predictor(&server.url)).unwrap();
        let got: Vec<(u64, &str, u32, u32)> = prompts
            .iter()
            .map(|p| (p.id, p.as_str(), p.range.lo(), p.range.hi()))
            .collect();
        assert_eq!(
            got,
            [
                (0, "Write a poem about rain.", 300, 600),
                (1, "写一篇两千字的文章", 1800, 2200)
            ]
        );
        let url = runtime.block_on(server.stop());
        let err = load_prompts(&with_predictor(&url)).unwrap_err().to_string();
        assert!(
            err.contains("line 1: the range predictor") && err.contains("unreachable"),
            "{err}"
        );
        let bad = DataSection {
            range_predictor: Some(RangePredictorSection {
                template: "/no/template.txt".into(),
                ..RangePredictorSection::default()
            }),
            ..section(&path)
        };
        let err = load_prompts(&bad).unwrap_err().to_string();
        assert!(
            err.starts_with("data.range_predictor.template: /no/template.txt"),
            "{err}"
        );
    }

    #[test]
    fn epochs_shuffle_reproducibly_and_end() {
        let mut a = Dataset::new(default_prompts(), 7, true, 2);
        let mut b = Dataset::new(default_prompts(), 7, true, 2);
        let first: Vec<u64> = (0..24).map(|_| a.next_prompt().unwrap().id).collect();
        let mut sorted = first.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..24).collect::<Vec<_>>(),
            "one epoch serves every prompt once"
        );
        assert_ne!(first, sorted, "shuffled");
        let second: Vec<u64> = (0..24).map(|_| a.next_prompt().unwrap().id).collect();
        assert_ne!(first, second, "each epoch has its own order");
        assert_eq!(a.next_prompt(), None, "two epochs only");
        let replay: Vec<u64> = (0..24).map(|_| b.next_prompt().unwrap().id).collect();
        assert_eq!(first, replay);
    }

    #[test]
    fn a_restored_cursor_continues_the_same_sequence() {
        let mut a = Dataset::new(default_prompts(), 1, true, 0);
        for _ in 0..30 {
            a.next_prompt();
        }
        let cursor = a.cursor();
        let rest: Vec<u64> = (0..10).map(|_| a.next_prompt().unwrap().id).collect();
        let mut b = Dataset::new(default_prompts(), 1, true, 0);
        b.restore(cursor);
        let again: Vec<u64> = (0..10).map(|_| b.next_prompt().unwrap().id).collect();
        assert_eq!(rest, again);
    }
}

//! `quill data ranges IN OUT`: writes every prompt of a JSONL file to OUT with a
//! `length_range`, from the record itself, the stated-count rules, or the predictor;
//! prompts with no sensible range are left out and counted. Progress is saved after
//! every record (`OUT.progress.json`), so an interrupted run continues where it stopped.

use super::predictor::{Prediction, RangePredictor};
use super::RangeError;
use quill_reward::parse_length_range;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Field names of the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillFields {
    /// The question (rendered with the template in a job).
    pub question: String,
    /// A ready-made prompt (used when there is no question).
    pub prompt: String,
    /// A target word count; records with it are kept as they are.
    pub length: String,
    /// The `[lo, hi]` range written (records that have it are kept as they are).
    pub range: String,
}

impl Default for FillFields {
    fn default() -> Self {
        FillFields {
            question: "question".into(),
            prompt: "prompt".into(),
            length: "length".into(),
            range: "length_range".into(),
        }
    }
}

/// How the prompts were decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FillCounts {
    /// Records that already had a range or a length.
    pub given: usize,
    /// Ranges from the stated-count rules.
    pub stated: usize,
    /// Ranges from the predictor.
    pub predicted: usize,
    /// Left out: the predictor said `[0, 0]`.
    pub no_range: usize,
    /// Left out: the predictor's replies were not a valid range (after retries).
    pub bad_reply: usize,
    /// Left out: no stated length and no predictor.
    pub unpredicted: usize,
}

impl FillCounts {
    /// Records written.
    pub fn kept(&self) -> usize {
        self.given + self.stated + self.predicted
    }

    /// Records left out.
    pub fn skipped(&self) -> usize {
        self.no_range + self.bad_reply + self.unpredicted
    }
}

/// Where an unfinished run stands.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Resume {
    /// Input lines done.
    lines: usize,
    /// Bytes of OUT that belong to them.
    bytes: u64,
    counts: FillCounts,
}

fn io(path: &Path, source: std::io::Error) -> RangeError {
    RangeError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn progress_path(output: &Path) -> PathBuf {
    let mut name = output.as_os_str().to_owned();
    name.push(".progress.json");
    PathBuf::from(name)
}

/// Fills ranges from `input` into `output` (see the module docs). `on_record` is called
/// after each input line with the counts so far, the lines done and the total lines.
/// An error from the endpoint itself (down, timing out, refusing) stops the run; the
/// progress file lets the next run continue.
pub async fn fill_ranges(
    input: &Path,
    output: &Path,
    fields: &FillFields,
    predictor: Option<&RangePredictor>,
    on_record: &mut dyn FnMut(&FillCounts, usize, usize),
) -> Result<FillCounts, RangeError> {
    let text = std::fs::read_to_string(input).map_err(|e| io(input, e))?;
    let lines: Vec<&str> = text.lines().collect();
    let progress = progress_path(output);
    let mut state = if progress.exists() {
        let saved = std::fs::read_to_string(&progress).map_err(|e| io(&progress, e))?;
        serde_json::from_str::<Resume>(&saved).map_err(|e| RangeError::Record {
            path: progress.display().to_string(),
            line: 1,
            reason: format!("not a progress file: {e}"),
        })?
    } else if output.exists() {
        return Err(io(
            output,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists and holds no unfinished run; remove it or choose another OUT",
            ),
        ));
    } else {
        Resume::default()
    };
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(output)
        .map_err(|e| io(output, e))?;
    out.set_len(state.bytes).map_err(|e| io(output, e))?;
    let mut out = std::io::BufWriter::new({
        use std::io::Seek;
        out.seek(std::io::SeekFrom::End(0))
            .map_err(|e| io(output, e))?;
        out
    });
    let shown = input.display().to_string();
    for (i, line) in lines.iter().enumerate().skip(state.lines) {
        if !line.trim().is_empty() {
            let record = decide(line, i + 1, &shown, fields, predictor, &mut state.counts).await?;
            if let Some(record) = record {
                writeln!(out, "{record}").map_err(|e| io(output, e))?;
            }
        }
        out.flush().map_err(|e| io(output, e))?;
        state.lines = i + 1;
        state.bytes = out.get_ref().metadata().map_err(|e| io(output, e))?.len();
        let partial = progress.with_extension("partial");
        std::fs::write(&partial, serde_json::to_string(&state).expect("serializes"))
            .and_then(|()| std::fs::rename(&partial, &progress))
            .map_err(|e| io(&progress, e))?;
        on_record(&state.counts, state.lines, lines.len());
    }
    out.get_ref().sync_all().map_err(|e| io(output, e))?;
    std::fs::remove_file(&progress).map_err(|e| io(&progress, e))?;
    Ok(state.counts)
}

/// The record to write for one input line (`None`: left out, counted).
async fn decide(
    line: &str,
    number: usize,
    path: &str,
    fields: &FillFields,
    predictor: Option<&RangePredictor>,
    counts: &mut FillCounts,
) -> Result<Option<Value>, RangeError> {
    let record_error = |reason: String| RangeError::Record {
        path: path.to_owned(),
        line: number,
        reason,
    };
    let mut value: Value =
        serde_json::from_str(line).map_err(|e| record_error(format!("invalid JSON: {e}")))?;
    let Some(object) = value.as_object_mut() else {
        return Err(record_error("must be a JSON object".into()));
    };
    let present = |name: &str| object.get(name).is_some_and(|v| !v.is_null());
    if present(&fields.range) || present(&fields.length) {
        counts.given += 1;
        return Ok(Some(value));
    }
    let text = [&fields.question, &fields.prompt]
        .iter()
        .find_map(|f| object.get(f.as_str()).and_then(Value::as_str))
        .filter(|t| !t.trim().is_empty())
        .map(str::to_owned)
        .ok_or_else(|| {
            record_error(format!(
                "needs a non-empty string `{}` or `{}`",
                fields.question, fields.prompt
            ))
        })?;
    let range = if let Some(range) = parse_length_range(&text) {
        counts.stated += 1;
        range
    } else if let Some(predictor) = predictor {
        match predictor.predict(&text).await {
            Ok(Prediction::Range(range)) => {
                counts.predicted += 1;
                range
            }
            Ok(Prediction::NoRange) => {
                counts.no_range += 1;
                return Ok(None);
            }
            Err(e) if e.is_endpoint_failure() => return Err(e),
            Err(e) => {
                tracing::warn!("{path}, line {number}: left out: {e}");
                counts.bad_reply += 1;
                return Ok(None);
            }
        }
    } else {
        counts.unpredicted += 1;
        return Ok(None);
    };
    object.insert(fields.range.clone(), json!([range.lo(), range.hi()]));
    Ok(Some(value))
}

//! The per-sample results file (`OUT/samples.jsonl`): one record per model and prompt,
//! appended as each finishes, read back on the next run so that finished samples are
//! not redone. A line cut short by a kill is dropped; any other bad line is an error.

use super::critic::CriticResult;
use super::pairwise::Outcome;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One model's comparison with one opponent on one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The opponent (`baseline` or a --compare name).
    pub opponent: String,
    /// The verdicts with the model's answer shown first (as A), then second (as B):
    /// `A`, `B`, `tie`, or `null` when the reply was unreadable.
    pub verdicts: [Option<String>; 2],
    /// The combined outcome for the model; `null` when neither verdict was readable.
    pub outcome: Option<Outcome>,
    /// How many of the two replies were unreadable.
    pub unparsable: usize,
}

/// Everything measured for one model on one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    /// The model's name.
    pub model: String,
    /// The prompt's id as text.
    pub id: String,
    /// The prompt's id as the prompt file gives it.
    pub idx: Value,
    /// The prompt's category.
    #[serde(rename = "type")]
    pub kind: String,
    /// The question.
    pub question: String,
    /// The required length, when the prompt gives one.
    pub required_length: Option<f64>,
    /// The answer's length in words (English words plus CJK characters).
    pub output_length: usize,
    /// LongBench-Write's length score (0–100), when a length is required.
    pub length_score: Option<f64>,
    /// The whole generated response.
    pub response: String,
    /// The answer taken from it.
    pub answer: String,
    /// Why generation ended.
    pub finish_reason: String,
    /// The critic's score, when judged.
    pub critic: Option<CriticResult>,
    /// Pairwise comparisons, when judged.
    pub pairwise: Vec<Comparison>,
}

/// The samples file: the records read back, and the handle new ones are appended to.
pub struct SampleStore {
    path: PathBuf,
    file: File,
    records: Vec<SampleRecord>,
    done: HashMap<(String, String), usize>,
}

impl SampleStore {
    /// Opens (or creates) `path` and reads its records.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut records = Vec::new();
        let mut done = HashMap::new();
        let mut kept = 0;
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                kept += line.len();
                continue;
            }
            match serde_json::from_str::<SampleRecord>(line) {
                Ok(record) => {
                    let key = (record.model.clone(), record.id.clone());
                    if done.insert(key, records.len()).is_some() {
                        bail!(
                            "{} line {}: model {} prompt {} is recorded twice; delete one line",
                            path.display(),
                            i + 1,
                            record.model,
                            record.id
                        );
                    }
                    records.push(record);
                    kept += line.len();
                }
                Err(e) if i + 1 == lines.len() && !line.ends_with('\n') => {
                    tracing::warn!(
                        "{} line {}: dropping a record cut short ({e}); it will be redone",
                        path.display(),
                        i + 1
                    );
                }
                Err(e) => bail!(
                    "{} line {}: not a sample record ({e}); delete the line to redo that sample",
                    path.display(),
                    i + 1
                ),
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        if kept < text.len() {
            file.set_len(kept as u64)
                .with_context(|| format!("truncating {}", path.display()))?;
        }
        Ok(SampleStore {
            path: path.to_owned(),
            file,
            records,
            done,
        })
    }

    /// Whether `model` has a record for prompt `id`.
    pub fn has(&self, model: &str, id: &str) -> bool {
        self.done.contains_key(&(model.to_owned(), id.to_owned()))
    }

    /// `model`'s record for prompt `id`.
    pub fn get(&self, model: &str, id: &str) -> Option<&SampleRecord> {
        self.done
            .get(&(model.to_owned(), id.to_owned()))
            .map(|&i| &self.records[i])
    }

    /// Appends a record as one line, written at once.
    pub fn append(&mut self, record: SampleRecord) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(&record)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .with_context(|| format!("appending to {}", self.path.display()))?;
        self.done.insert(
            (record.model.clone(), record.id.clone()),
            self.records.len(),
        );
        self.records.push(record);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(model: &str, id: &str) -> SampleRecord {
        SampleRecord {
            model: model.into(),
            id: id.into(),
            idx: Value::from(id),
            kind: "-".into(),
            question: "q".into(),
            required_length: Some(10.0),
            output_length: 5,
            length_score: Some(50.0),
            response: "r".into(),
            answer: "a".into(),
            finish_reason: "length".into(),
            critic: None,
            pairwise: Vec::new(),
        }
    }

    #[test]
    fn records_survive_a_reopen_and_a_cut_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("samples.jsonl");
        let mut store = SampleStore::open(&path).unwrap();
        store.append(record("m", "1")).unwrap();
        store.append(record("m", "2")).unwrap();
        drop(store);
        // A kill in the middle of a write leaves part of a line.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"model": "m", "id": "3", "idx"#)
            .unwrap();
        drop(file);
        let mut store = SampleStore::open(&path).unwrap();
        assert!(store.has("m", "1") && store.has("m", "2") && !store.has("m", "3"));
        assert_eq!(store.get("m", "2"), Some(&record("m", "2")));
        store.append(record("m", "3")).unwrap();
        drop(store);
        let store = SampleStore::open(&path).unwrap();
        assert!(store.has("m", "3"));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }

    #[test]
    fn a_bad_line_inside_the_file_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("samples.jsonl");
        let good = serde_json::to_string(&record("m", "1")).unwrap();
        std::fs::write(&path, format!("{good}\nnonsense\n")).unwrap();
        let e = SampleStore::open(&path).err().unwrap().to_string();
        assert!(
            e.contains("line 2") && e.contains("not a sample record"),
            "{e}"
        );
        std::fs::write(&path, format!("{good}\n{good}\n")).unwrap();
        let e = SampleStore::open(&path).err().unwrap().to_string();
        assert!(e.contains("line 2") && e.contains("twice"), "{e}");
    }
}

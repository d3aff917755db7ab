//! JSON-lines metrics files: [`Record`]s appended by a [`MetricsWriter`], one object a
//! line, and read back by [`read_records`].

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// Anything that can go wrong while writing or reading a metrics file.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The file (or its parent directory) could not be created, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A line of a metrics file is not a JSON object.
    #[error("{path}: line {line}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The line's number, counting from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// One metrics record: a JSON object with a `"kind"` and a `"time"`, built field by field.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    fields: Map<String, Value>,
}

impl Record {
    /// A record of the given kind (e.g. `"step"`), stamped with the current unix time in
    /// seconds under `"time"`.
    pub fn new(kind: &str) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut fields = Map::new();
        fields.insert("kind".to_owned(), Value::from(kind));
        fields.insert("time".to_owned(), Value::from(now));
        Self { fields }
    }

    /// Sets a field, replacing any earlier value under the same key. A non-finite `f64`
    /// (NaN, ±infinity) becomes `null`, since JSON has no such numbers.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(key.to_owned(), value.into());
        self
    }

    /// The record's fields, `"kind"` and `"time"` included.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }
}

/// Appends records to a JSON-lines file, one object per line, each flushed as it is
/// written. Shared by reference between threads: each record is written whole.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: Mutex<File>,
}

impl MetricsWriter {
    /// Opens `path` for appending, creating it and its parent directories if needed. An
    /// existing file keeps its records, so a resumed job continues the same file.
    pub fn create(path: &Path) -> Result<Self, TelemetryError> {
        let io_err = |source| TelemetryError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err)?;
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(file),
        })
    }

    /// The file this writer appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as a line and flushes it to the file.
    pub fn write(&self, record: &Record) -> Result<(), TelemetryError> {
        let io_err = |source| TelemetryError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(&record.fields).map_err(|e| io_err(e.into()))?;
        line.push(b'\n');
        // A panic elsewhere while holding the lock cannot leave half a line behind (each
        // line is one `write_all`), so a poisoned lock is safe to keep using.
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(&line).map_err(io_err)?;
        file.flush().map_err(io_err)
    }
}

/// Reads every record of a JSON-lines metrics file, in file order. Blank lines are
/// skipped; a line that is not a JSON object is an error naming its line number.
pub fn read_records(path: &Path) -> Result<Vec<Map<String, Value>>, TelemetryError> {
    let text = std::fs::read_to_string(path).map_err(|source| TelemetryError::Io {
        path: path.to_owned(),
        source,
    })?;
    let malformed = |line: usize, reason: String| TelemetryError::Malformed {
        path: path.to_owned(),
        line,
        reason,
    };
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(map)) => records.push(map),
            Ok(other) => {
                return Err(malformed(
                    i + 1,
                    format!("expected a JSON object, found {}", json_type(&other)),
                ))
            }
            Err(e) => return Err(malformed(i + 1, format!("invalid JSON: {e}"))),
        }
    }
    Ok(records)
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_keeps_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/metrics.jsonl");
        let writer = MetricsWriter::create(&path).unwrap();
        assert_eq!(writer.path(), path);
        let a = Record::new("step")
            .with("step", 1)
            .with("reward_mean", 0.25)
            .with("note", "warm-up")
            .with("ok", true);
        let b = Record::new("throughput").with("generated_tokens_per_s", 1234.5);
        writer.write(&a).unwrap();
        writer.write(&b).unwrap();
        let records = read_records(&path).unwrap();
        assert_eq!(records, vec![a.fields().clone(), b.fields().clone()]);
        assert_eq!(records[0]["kind"], "step");
        assert_eq!(records[0]["step"], 1);
        assert_eq!(records[0]["reward_mean"], 0.25);
        assert!(records[0]["time"].as_f64().unwrap() > 1.0e9);
        assert_eq!(records[1]["kind"], "throughput");
    }

    #[test]
    fn reopening_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        MetricsWriter::create(&path)
            .unwrap()
            .write(&Record::new("step").with("step", 1))
            .unwrap();
        MetricsWriter::create(&path)
            .unwrap()
            .write(&Record::new("step").with("step", 2))
            .unwrap();
        let steps: Vec<i64> = read_records(&path)
            .unwrap()
            .iter()
            .map(|r| r["step"].as_i64().unwrap())
            .collect();
        assert_eq!(steps, vec![1, 2]);
    }

    #[test]
    fn threads_share_one_writer_without_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let writer = MetricsWriter::create(&path).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let writer = &writer;
                s.spawn(move || {
                    for i in 0..50 {
                        let record = Record::new("step").with("thread", t).with("i", i);
                        writer.write(&record).unwrap();
                    }
                });
            }
        });
        assert_eq!(read_records(&path).unwrap().len(), 200);
    }

    #[test]
    fn non_finite_numbers_become_null() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let writer = MetricsWriter::create(&path).unwrap();
        writer
            .write(
                &Record::new("step")
                    .with("nan", f64::NAN)
                    .with("inf", f64::INFINITY)
                    .with("neg_inf", f32::NEG_INFINITY)
                    .with("fine", 1.5),
            )
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"nan\":null"), "{text}");
        assert!(!text.contains("NaN"), "{text}");
        let record = &read_records(&path).unwrap()[0];
        assert_eq!(record["nan"], Value::Null);
        assert_eq!(record["inf"], Value::Null);
        assert_eq!(record["neg_inf"], Value::Null);
        assert_eq!(record["fine"], 1.5);
    }

    #[test]
    fn blank_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "\n{\"kind\":\"step\"}\n   \n{\"kind\":\"eval\"}\n\n").unwrap();
        let records = read_records(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1]["kind"], "eval");
    }

    #[test]
    fn malformed_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"kind\":\"step\"}\n\n{\"kind\": \"step\", oops}\n").unwrap();
        let err = read_records(&path).unwrap_err();
        assert!(
            matches!(err, TelemetryError::Malformed { line: 3, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("metrics.jsonl: line 3: invalid JSON"), "{msg}");

        std::fs::write(&path, "{\"kind\":\"step\"}\n[1, 2]\n").unwrap();
        let msg = read_records(&path).unwrap_err().to_string();
        assert!(
            msg.contains("line 2: expected a JSON object, found an array"),
            "{msg}"
        );
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.jsonl");
        let err = read_records(&path).unwrap_err();
        assert!(matches!(err, TelemetryError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("absent.jsonl"), "{err}");
    }

    #[test]
    fn record_with_replaces_and_accepts_json_values() {
        let record = Record::new("eval")
            .with("x", 1)
            .with("x", 2)
            .with("nested", json!({"a": [1, 2]}));
        assert_eq!(record.fields()["x"], 2);
        assert_eq!(record.fields()["nested"]["a"][1], 2);
        assert_eq!(record.fields()["kind"], "eval");
    }
}

//! Reading the prompt file and other models' answer files: every line checked, errors
//! naming the file, the line, the field and the flag that names it.

use anyhow::{bail, Context};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::Path;

/// One prompt to evaluate.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// Its position in the file (0-based, among non-blank lines); seeds its sampling.
    pub position: usize,
    /// Its id as text (the key of its results).
    pub id: String,
    /// Its id as the file gives it.
    pub id_value: Value,
    /// The question.
    pub question: String,
    /// Its category (`-` when the record has none).
    pub kind: String,
    /// The required length in words, when given.
    pub length: Option<f64>,
    /// The baseline's answer, when given.
    pub baseline: Option<String>,
}

/// The field names of a prompt record.
pub struct Fields<'a> {
    /// `--question-field`.
    pub question: &'a str,
    /// `--id-field`.
    pub id: &'a str,
    /// `--length-field`.
    pub length: &'a str,
    /// `--type-field`.
    pub kind: &'a str,
    /// `--baseline-field`.
    pub baseline: &'a str,
}

/// The JSON objects of a JSONL file with their 1-based line numbers (blank lines
/// skipped); `what` names the file in errors (e.g. `--prompts FILE`).
fn read_objects(path: &Path, what: &str) -> anyhow::Result<Vec<(usize, Map<String, Value>)>> {
    let text = std::fs::read_to_string(path).with_context(|| what.to_owned())?;
    let mut objects = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(map)) => objects.push((i + 1, map)),
            Ok(other) => bail!("{what} line {}: expected a JSON object, got {other}", i + 1),
            Err(e) => bail!("{what} line {}: not JSON ({e})", i + 1),
        }
    }
    Ok(objects)
}

/// An id value as text: a string as it is, a number in JSON.
fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads the prompt file (the first `limit` prompts when given).
pub fn read_prompts(
    path: &Path,
    fields: &Fields<'_>,
    limit: Option<usize>,
) -> anyhow::Result<Vec<Prompt>> {
    let what = format!("--prompts {}", path.display());
    let mut objects = read_objects(path, &what)?;
    if let Some(limit) = limit {
        objects.truncate(limit);
    }
    if objects.is_empty() {
        bail!("{what}: no prompts in the file");
    }
    let mut prompts = Vec::with_capacity(objects.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (position, (line, record)) in objects.into_iter().enumerate() {
        let at = || format!("{what} line {line}");
        let question = match record.get(fields.question) {
            Some(Value::String(q)) if !q.trim().is_empty() => q.clone(),
            Some(Value::String(_)) => bail!(
                "{}: the question field `{}` is empty",
                at(),
                fields.question
            ),
            _ => bail!(
                "{}: no string field `{}` (the question; --question-field)",
                at(),
                fields.question
            ),
        };
        let id_value = record
            .get(fields.id)
            .cloned()
            .unwrap_or_else(|| Value::from(line));
        let id = id_text(&id_value).with_context(|| {
            format!(
                "{}: the id field `{}` must be a number or a string (--id-field), got {id_value}",
                at(),
                fields.id
            )
        })?;
        if let Some(first) = seen.insert(id.clone(), line) {
            bail!(
                "{}: the id {id} (field `{}`) is also on line {first}; ids must be unique",
                at(),
                fields.id
            );
        }
        let length = match record.get(fields.length) {
            None | Some(Value::Null) => None,
            Some(value) => {
                let number = match value {
                    Value::Number(n) => n.as_f64(),
                    Value::String(s) => s.trim().parse::<f64>().ok(),
                    _ => None,
                };
                match number {
                    Some(n) if n.is_finite() && n > 0.0 => Some(n),
                    _ => bail!(
                        "{}: the length field `{}` must be a number above 0 (--length-field), got {value}",
                        at(),
                        fields.length
                    ),
                }
            }
        };
        let kind = match record.get(fields.kind) {
            None | Some(Value::Null) => "-".to_owned(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        let baseline = match record.get(fields.baseline) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => bail!(
                "{}: the baseline field `{}` must be a string (--baseline-field), got {}",
                at(),
                fields.baseline,
                other.to_string().chars().take(80).collect::<String>()
            ),
        };
        prompts.push(Prompt {
            position,
            id,
            id_value,
            question,
            kind,
            length,
            baseline,
        });
    }
    Ok(prompts)
}

/// Another model's answers by prompt id, from a JSONL file with the id field and
/// `answer` or `response` on every line; `what` names the flag and file in errors.
pub fn read_answers(
    path: &Path,
    id_field: &str,
    what: &str,
) -> anyhow::Result<HashMap<String, String>> {
    let mut answers = HashMap::new();
    let mut lines: HashMap<String, usize> = HashMap::new();
    for (line, record) in read_objects(path, what)? {
        let id = record.get(id_field).and_then(id_text).with_context(|| {
            format!(
                "{what} line {line}: no id field `{id_field}` (a number or a string; --id-field)"
            )
        })?;
        let answer = ["answer", "response"]
            .iter()
            .find_map(|f| record.get(*f).and_then(Value::as_str))
            .with_context(|| {
                format!("{what} line {line}: no string field `answer` or `response`")
            })?;
        if let Some(first) = lines.insert(id.clone(), line) {
            bail!("{what} line {line}: the id {id} is also on line {first} (one model's answers per file)");
        }
        answers.insert(id, answer.to_owned());
    }
    if answers.is_empty() {
        bail!("{what}: no answers in the file");
    }
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: Fields<'static> = Fields {
        question: "question",
        id: "idx",
        length: "length",
        kind: "type",
        baseline: "baseline_response",
    };

    fn read(text: &str) -> anyhow::Result<Vec<Prompt>> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        read_prompts(file.path(), &FIELDS, None)
    }

    #[test]
    fn arena_write_records_are_read() {
        let prompts = read(concat!(
            r#"{"idx": 7, "question": "Write a story.", "type": "fiction", "length": 800, "baseline_response": "Once."}"#,
            "\n\n",
            r#"{"question": "写一首诗", "length": "300"}"#,
            "\n"
        ))
        .unwrap();
        assert_eq!(prompts.len(), 2);
        assert_eq!(prompts[0].id, "7");
        assert_eq!(prompts[0].kind, "fiction");
        assert_eq!(prompts[0].length, Some(800.0));
        assert_eq!(prompts[0].baseline.as_deref(), Some("Once."));
        assert_eq!((prompts[1].id.as_str(), prompts[1].position), ("3", 1));
        assert_eq!(prompts[1].kind, "-");
        assert_eq!(prompts[1].length, Some(300.0));
    }

    #[test]
    fn bad_records_name_the_line_field_and_flag() {
        let good = r#"{"idx": 1, "question": "q", "length": 100}"#;
        let error = |text: &str| format!("{:#}", read(text).unwrap_err());
        let e = error(&format!("{good}\n{{not json\n"));
        assert!(e.contains("line 2: not JSON"), "{e}");
        let e = error(&format!("{good}\n{{\"idx\": 2, \"prompt\": \"q\"}}\n"));
        assert!(
            e.contains("line 2") && e.contains("`question`") && e.contains("--question-field"),
            "{e}"
        );
        for bad in ["0", "-5", "\"many\"", "[1]"] {
            let e = error(&format!(
                "{{\"idx\": 2, \"question\": \"q\", \"length\": {bad}}}"
            ));
            assert!(
                e.contains("line 1") && e.contains("above 0") && e.contains("--length-field"),
                "{e}"
            );
        }
        let e = error(&format!("{good}\n{good}\n"));
        assert!(e.contains("line 2") && e.contains("also on line 1"), "{e}");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            "{\"idx\": 1, \"answer\": \"a\"}\n{\"idx\": 1, \"response\": \"b\"}\n",
        )
        .unwrap();
        let e = read_answers(file.path(), "idx", "--compare x=F")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--compare x=F line 2") && e.contains("also on line 1"),
            "{e}"
        );
        std::fs::write(file.path(), "{\"idx\": 1, \"text\": \"a\"}\n").unwrap();
        let e = read_answers(file.path(), "idx", "--compare x=F")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 1") && e.contains("`answer` or `response`"),
            "{e}"
        );
        std::fs::write(file.path(), "{\"idx\": 2, \"response\": \"b\"}\n").unwrap();
        let answers = read_answers(file.path(), "idx", "--compare x=F").unwrap();
        assert_eq!(answers["2"], "b");
        let e = error("\n\n");
        assert!(e.contains("no prompts"), "{e}");
        let e = format!(
            "{:#}",
            read_prompts(Path::new("/no/such/file.jsonl"), &FIELDS, None).unwrap_err()
        );
        assert!(e.contains("--prompts /no/such/file.jsonl"), "{e}");
    }
}

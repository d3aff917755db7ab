//! The settings a run's per-sample results depend on, kept in `OUT/run.json`: a second
//! run into the same folder must use the same ones, so that resumed results are never
//! a mix. (Models may be added: each model's records are its own.)

use anyhow::{bail, Context};
use serde_json::{Map, Value};
use std::path::Path;

/// Writes `settings` to `path`, or checks them against the ones there; a difference is
/// an error naming each setting that changed.
pub fn check_or_write(path: &Path, settings: &Map<String, Value>) -> anyhow::Result<()> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let before: Map<String, Value> = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a settings file", path.display()))?;
            let mut changed: Vec<String> = settings
                .iter()
                .filter(|(key, value)| before.get(*key) != Some(*value))
                .map(|(key, value)| {
                    let old = before
                        .get(key)
                        .map_or("nothing".to_owned(), Value::to_string);
                    format!("{key}: {} → {value}", short(&old))
                })
                .collect();
            changed.extend(
                before
                    .keys()
                    .filter(|k| !settings.contains_key(*k))
                    .map(|k| format!("{k}: no longer set")),
            );
            if !changed.is_empty() {
                bail!(
                    "{} holds results made with other settings ({}); use another --out, or \
                     delete the folder to start over",
                    path.parent().unwrap_or(path).display(),
                    changed.join("; ")
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(path, serde_json::to_string_pretty(settings)?)
                .with_context(|| format!("writing {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn short(text: &str) -> String {
    if text.chars().count() > 60 {
        format!("{}…", text.chars().take(60).collect::<String>())
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn the_same_settings_pass_and_changed_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.json");
        let settings = map(json!({"temperature": 0.8, "judge_model": "a"}));
        check_or_write(&path, &settings).unwrap();
        check_or_write(&path, &settings).unwrap();
        let changed = map(json!({"temperature": 0.8, "judge_model": "b"}));
        let e = check_or_write(&path, &changed).unwrap_err().to_string();
        assert!(
            e.contains("judge_model: \"a\" → \"b\"") && !e.contains("temperature"),
            "{e}"
        );
    }
}

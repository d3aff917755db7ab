//! The models a run evaluates: a remote one (--endpoint), or local folders from --model
//! and --checkpoints, named by their folder (a folder named step-N is training step N).

use super::report::ModelInfo;
use super::Args;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

/// Where a model's answers come from.
pub enum Source {
    /// A local model folder, or `default`.
    Local(String),
    /// `--endpoint`.
    Remote,
}

/// One model to evaluate.
pub struct ModelSpec {
    /// Its name and step.
    pub info: ModelInfo,
    /// Where its answers come from.
    pub source: Source,
}

/// The step of a model named `step-N`.
fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// The models to evaluate, from --endpoint, --model and --checkpoints.
pub fn model_specs(args: &Args) -> anyhow::Result<Vec<ModelSpec>> {
    if let Some(name) = &args.endpoint_model {
        if !args.model.is_empty() || args.checkpoints.is_some() {
            bail!("--endpoint generates with a remote model: give --endpoint or --model/--checkpoints, not both");
        }
        return Ok(vec![ModelSpec {
            info: ModelInfo {
                name: name.clone(),
                step: step_of(name),
            },
            source: Source::Remote,
        }]);
    }
    let mut paths = args.model.clone();
    if let Some(dir) = &args.checkpoints {
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("--checkpoints {}", dir.display()))?;
        let mut steps: Vec<(u64, PathBuf)> = Vec::new();
        for entry in entries {
            let path = entry
                .with_context(|| format!("--checkpoints {}", dir.display()))?
                .path();
            let step = path.file_name().and_then(|n| step_of(&n.to_string_lossy()));
            if let (Some(step), true) = (step, path.is_dir()) {
                steps.push((step, path));
            }
        }
        if steps.is_empty() {
            bail!("--checkpoints {}: no step-N folders in it", dir.display());
        }
        steps.sort();
        paths.extend(steps.into_iter().map(|(_, p)| p.display().to_string()));
    }
    if paths.is_empty() {
        paths.push("default".to_owned());
    }
    let mut specs: Vec<ModelSpec> = Vec::new();
    for path in paths {
        let name = if path == "default" {
            path.clone()
        } else {
            if !Path::new(&path).is_dir() {
                bail!("--model {path}: no such model folder");
            }
            Path::new(&path)
                .file_name()
                .map_or(path.clone(), |n| n.to_string_lossy().into_owned())
        };
        if specs.iter().any(|s| s.info.name == name) {
            bail!("--model {path}: another model is also named `{name}`; give distinct folders");
        }
        specs.push(ModelSpec {
            info: ModelInfo {
                step: step_of(&name),
                name,
            },
            source: Source::Local(path),
        });
    }
    Ok(specs)
}

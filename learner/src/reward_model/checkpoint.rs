//! Reward-model checkpoints: `OUT/checkpoints/step-NNNNNNNN/`, each a Hugging Face
//! `Qwen2ForSequenceClassification` folder (config, safetensors, tokenizer) plus
//! `optimizer.safetensors` and `progress.json` (where training stands). A checkpoint is
//! written under a temporary name and renamed when complete, so an interruption while
//! writing never leaves a half checkpoint that looks whole.

use super::init::ModelSource;
use super::{Result, RmError};
use crate::AdamW;
use quill_model::Qwen2;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Kind;

/// The file in a checkpoint that says where training stands.
const PROGRESS_FILE: &str = "progress.json";
/// The optimizer state in a checkpoint.
pub(super) const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Where training stands: updates done, the epoch and the next batch in it, the running
/// training sums of that epoch, and the data sizes it was made with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer updates done.
    pub step: u64,
    /// The current epoch (0-based).
    pub epoch: u32,
    /// The next batch of the current epoch.
    pub batch: usize,
    /// Sum of the pair losses of the current epoch so far.
    pub epoch_loss: f64,
    /// Pairs ranked right in the current epoch so far.
    pub epoch_correct: f64,
    /// Pairs seen in the current epoch so far.
    pub epoch_pairs: f64,
    /// Training pairs (checked on resume).
    pub train_pairs: usize,
    /// Held-out pairs (checked on resume).
    pub eval_pairs: usize,
}

/// The newest complete checkpoint under `out`, if any.
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(out.join("checkpoints")).ok()?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
                && p.join(PROGRESS_FILE).is_file()
        })
        .max()
}

/// Reads a checkpoint's progress.
pub(super) fn read_progress(dir: &Path) -> Result<Progress> {
    let path = dir.join(PROGRESS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| RmError::Checkpoint {
        path: dir.to_owned(),
        reason: format!("{PROGRESS_FILE}: {e}"),
    })?;
    serde_json::from_str(&text).map_err(|e| RmError::Checkpoint {
        path: dir.to_owned(),
        reason: format!("{PROGRESS_FILE}: {e}"),
    })
}

fn io(dir: &Path, what: &str, e: impl std::fmt::Display) -> RmError {
    RmError::Checkpoint {
        path: dir.to_owned(),
        reason: format!("{what}: {e}"),
    }
}

/// Writes the model (Hugging Face layout) and its tokenizer into `dir`.
pub(super) fn write_model(dir: &Path, model: &Qwen2, source: &ModelSource) -> Result<()> {
    model.save(dir, Kind::Float)?;
    source.write_tokenizer(dir)
}

/// Writes a checkpoint of `model`, `optimizer` and `progress` under `out` and keeps the
/// newest `keep` checkpoints; returns its folder.
pub(super) fn save(
    out: &Path,
    model: &Qwen2,
    source: &ModelSource,
    optimizer: &AdamW,
    progress: &Progress,
    keep: usize,
) -> Result<PathBuf> {
    let root = out.join("checkpoints");
    let dir = root.join(format!("step-{:08}", progress.step));
    let partial = root.join(format!(".step-{:08}.partial", progress.step));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| io(&partial, "removing", e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| io(&partial, "creating", e))?;
    write_model(&partial, model, source)?;
    optimizer.state().write(&partial.join(OPTIMIZER_FILE))?;
    let json = serde_json::to_string_pretty(progress).expect("progress serializes");
    std::fs::write(partial.join(PROGRESS_FILE), json)
        .map_err(|e| io(&partial, PROGRESS_FILE, e))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, "replacing", e))?;
    }
    std::fs::rename(&partial, &dir).map_err(|e| io(&dir, "renaming", e))?;
    prune(&root, keep.max(1))?;
    Ok(dir)
}

/// Removes all but the newest `keep` checkpoints in `root`.
fn prune(root: &Path, keep: usize) -> Result<()> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| io(root, "listing", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(keep);
    for old in &dirs[..excess] {
        std::fs::remove_dir_all(old).map_err(|e| io(old, "pruning", e))?;
    }
    Ok(())
}

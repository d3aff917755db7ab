//! Training checkpoints: a Hugging Face model directory plus optimizer and trainer state,
//! written atomically.
//!
//! A checkpoint of step `N` is the directory `<root>/step-NNNNNNNN` holding the model
//! (`config.json`, safetensors weights, the tokenizer files), [`OPTIMIZER_FILE`] and
//! [`STATE_FILE`]. It is written into `<root>/step-NNNNNNNN.tmp-<pid>-<n>`, synced to disk,
//! and renamed into place, so a crash never leaves a half checkpoint under a `step-` name.
//!
//! A sharded learner (`grpo.sharding`) writes no [`OPTIMIZER_FILE`]: rank 0's directory
//! holds the full model (every ZeRO-1/2 rank holds all weights; ZeRO-3 ranks gather the
//! layers' weights for it, one layer at a time) and [`SHARDING_FILE`]
//! (world size, mode, update count), and every rank writes its optimiser shard (f32 master
//! and moments of its range) to `<root>/step-NNNNNNNN.shards/rank-RRRRR-of-KKKKK.safetensors`,
//! each file written to a scratch name and renamed. The ranks must share the checkpoint
//! folder (one machine, or a shared file system). Such a checkpoint resumes only on a
//! group of the same world size with sharding on (ZeRO-1 and ZeRO-2 shard alike; ZeRO-3
//! shards each layer apart, so its shards resume only under ZeRO-3); anything else is
//! refused with an error that says so (the shards are not re-split).

use crate::error::{LearnerError, Result};
use crate::train::optim::OptimizerState;
use crate::train::shard::{shard_file_name, ShardState, Sharding};
use crate::train::trainer::{Progress, Trainer};
use quill_model::checkpoint::CheckpointReader;
use quill_model::device::dtype_name;
use quill_model::MAX_SHARD_BYTES;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tch::Tensor;

/// The optimizer state inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The trainer state inside a checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";
/// How a sharded learner's optimiser state is split (sharded checkpoints only).
pub const SHARDING_FILE: &str = "sharding.json";
/// Prefix of checkpoint directory names.
const PREFIX: &str = "step-";

/// Names the scratch directories of this process.
static SCRATCH: AtomicU64 = AtomicU64::new(0);

/// The trainer state saved with a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// The step counters.
    #[serde(flatten)]
    pub progress: Progress,
    /// The caller's own state (data cursor, RNG state …), stored as given.
    pub extra: Value,
}

/// The directory of the checkpoint of `step` under `root`.
pub fn checkpoint_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("{PREFIX}{step:08}"))
}

/// The directory of the optimiser shards of the checkpoint of `step` under `root`.
pub fn shards_dir(root: &Path, step: u64) -> PathBuf {
    sibling(&checkpoint_dir(root, step), SHARDS_SUFFIX)
}

/// Suffix of the shard directories.
const SHARDS_SUFFIX: &str = "shards";

/// What [`SHARDING_FILE`] says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardingInfo {
    /// Learner ranks that wrote the shards.
    pub world_size: usize,
    /// `grpo.sharding` of the learner that wrote them.
    pub sharding: Sharding,
    /// AdamW updates applied.
    pub optimizer_steps: u64,
}

/// One rank's optimiser shard copied off its trainer, to be written as its shard file of
/// a checkpoint (by every rank of a sharded learner, rank 0 included).
pub struct ShardSnapshot {
    step: u64,
    rank: usize,
    world: usize,
    state: ShardState,
}

impl ShardSnapshot {
    /// A copy of `trainer`'s shard; `None` when it holds no shard.
    pub fn take(trainer: &Trainer) -> Option<Self> {
        let shard = trainer.shard()?;
        Some(ShardSnapshot {
            step: trainer.progress().step,
            rank: shard.rank(),
            world: shard.world(),
            state: shard.state(trainer.optimizer().steps()),
        })
    }

    /// Writes the shard file under `root` (scratch name, synced, renamed) and returns
    /// its path.
    pub fn write(&self, root: &Path) -> Result<PathBuf> {
        let dir = shards_dir(root, self.step);
        std::fs::create_dir_all(&dir).map_err(|e| LearnerError::io(&dir, e))?;
        let path = dir.join(shard_file_name(self.rank, self.world));
        let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
        let scratch = sibling(&path, &format!("tmp-{}-{n}", std::process::id()));
        let written = self.state.write(&scratch).and_then(|()| sync(&scratch));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&scratch);
            return Err(e);
        }
        rename(&scratch, &path)?;
        sync(&dir)?;
        Ok(path)
    }
}

/// A checkpoint copied off the trainer: [`Self::take`] on the trainer's thread is a copy
/// of the tensors, [`Self::write`] (the disk work) may run on another thread while
/// training goes on.
pub struct Snapshot {
    state: TrainerState,
    config: Value,
    weights: Vec<(String, Tensor)>,
    optimizer: Option<OptimizerState>,
    sharding: Option<(ShardingInfo, ShardSnapshot)>,
    tokenizer_files: Vec<(String, Vec<u8>)>,
}

impl Snapshot {
    /// Copies `trainer`'s weights (gathered under ZeRO-3: every rank calls
    /// [`Trainer::full_weights`] at the same point), optimizer state and counters, with
    /// the tokenizer files (plain file names only) and the caller's `extra` state.
    pub fn take(
        trainer: &mut Trainer,
        tokenizer_files: &[(&str, &[u8])],
        extra: Value,
    ) -> Result<Self> {
        if let Some((name, _)) = tokenizer_files.iter().find(|(name, _)| {
            name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.')
        }) {
            return Err(LearnerError::state(
                Path::new(name),
                format!("tokenizer file name `{name}` is not a plain file name"),
            ));
        }
        let weights = trainer.full_weights(trainer.model().kind())?;
        let model = trainer.model();
        let sharding = ShardSnapshot::take(trainer).map(|shard| {
            let info = ShardingInfo {
                world_size: shard.world,
                sharding: trainer.config().sharding,
                optimizer_steps: trainer.optimizer().steps(),
            };
            (info, shard)
        });
        Ok(Snapshot {
            state: TrainerState {
                progress: trainer.progress(),
                extra,
            },
            config: model.config().to_json(dtype_name(model.kind())),
            weights,
            optimizer: sharding.is_none().then(|| trainer.optimizer().state()),
            sharding,
            tokenizer_files: tokenizer_files
                .iter()
                .map(|(name, bytes)| ((*name).to_owned(), bytes.to_vec()))
                .collect(),
        })
    }

    /// The step it is a checkpoint of.
    pub fn step(&self) -> u64 {
        self.state.progress.step
    }

    /// Writes the checkpoint under `root` (created if missing) atomically and returns its
    /// directory; an existing checkpoint of the same step is replaced.
    pub fn write(self, root: &Path) -> Result<PathBuf> {
        let step = self.step();
        if let Some((_, shard)) = &self.sharding {
            shard.write(root)?;
        }
        let dir = checkpoint_dir(root, step);
        let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
        let scratch = sibling(&dir, &format!("tmp-{}-{n}", std::process::id()));
        if scratch.exists() {
            // Left by a crashed process that had our pid; nobody else writes this name.
            remove_dir(&scratch)?;
        }
        if let Err(e) = self.write_into(&scratch) {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e);
        }
        if dir.exists() {
            let old = sibling(&dir, &format!("old-{}-{n}", std::process::id()));
            rename(&dir, &old)?;
            rename(&scratch, &dir)?;
            remove_dir(&old)?;
        } else {
            rename(&scratch, &dir)?;
        }
        sync(root)?;
        tracing::info!(dir = %dir.display(), step, "checkpoint written");
        Ok(dir)
    }

    /// Writes every file of the checkpoint into `dir` (created) and syncs them to disk.
    fn write_into(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| LearnerError::io(dir, e))?;
        quill_model::checkpoint::write_json(&dir.join("config.json"), &self.config)?;
        quill_model::checkpoint::write_tensors(dir, &self.weights, MAX_SHARD_BYTES)?;
        for (name, bytes) in &self.tokenizer_files {
            let path = dir.join(name);
            std::fs::write(&path, bytes).map_err(|e| LearnerError::io(&path, e))?;
        }
        if let Some(optimizer) = &self.optimizer {
            optimizer.write(&dir.join(OPTIMIZER_FILE))?;
        }
        if let Some((info, _)) = &self.sharding {
            let path = dir.join(SHARDING_FILE);
            let text = serde_json::to_string_pretty(info).expect("serialises");
            std::fs::write(&path, text + "\n").map_err(|e| LearnerError::io(&path, e))?;
        }
        let path = dir.join(STATE_FILE);
        let text = serde_json::to_string_pretty(&self.state).expect("JSON values always serialise");
        std::fs::write(&path, text + "\n").map_err(|e| LearnerError::io(&path, e))?;
        sync_tree(dir)
    }
}

/// Restores the model weights, optimizer state and counters of `trainer` from the
/// checkpoint `dir` and returns its saved state. Missing or mis-shaped tensors are errors
/// naming the tensor; the optimizer and trainer state are checked before anything is
/// changed, but a failure while copying the weights leaves the trainer unusable.
///
/// A sharded checkpoint needs a trainer with sharding on, and every rank's shard file
/// present; its optimiser shards are loaded after the trainer joins its group
/// ([`load_shard`], every rank).
pub fn load(dir: &Path, trainer: &mut Trainer) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| LearnerError::io(&path, e))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| LearnerError::state(&path, e.to_string()))?;
    let reader = CheckpointReader::open(dir)?;
    let info = sharding_info(dir)?;
    let sharded = trainer.config().sharding.shards();
    match &info {
        Some(info) if !sharded => {
            return Err(LearnerError::state(
                dir,
                format!(
                    "it holds the optimizer state of a sharded learner ({} ranks, grpo.sharding \
                     = \"{}\"); resume it with sharding on and {} learner ranks",
                    info.world_size,
                    info.sharding.name(),
                    info.world_size
                ),
            ))
        }
        Some(info) => {
            for rank in 0..info.world_size {
                let shard = shard_path(dir, rank, info.world_size)?;
                if !shard.is_file() {
                    return Err(LearnerError::state(
                        &shard,
                        format!("the optimizer shard of rank {rank} is missing"),
                    ));
                }
            }
        }
        None if sharded => {
            return Err(LearnerError::state(
                dir,
                "it holds the optimizer state of an unsharded learner; resume it with \
                 grpo.sharding = \"none\"",
            ))
        }
        None => {}
    }
    let (model, optimizer, progress) = trainer.parts_mut();
    match &info {
        Some(info) => optimizer.set_steps(info.optimizer_steps),
        None => optimizer.load(&dir.join(OPTIMIZER_FILE))?,
    }
    model.load_weights(&reader)?;
    *progress = state.progress;
    if info.is_some() {
        let (_, _, pending) = trainer.shard_parts_mut();
        *pending = Some(state.progress.step);
    }
    Ok(state)
}

/// Loads this rank's optimiser shard of the sharded checkpoint its group resumed from
/// ([`Trainer::pending_shards`]) from under `root`; nothing to do when there is none.
/// A checkpoint of another world size is an error that names both sizes.
pub fn load_shard(root: &Path, trainer: &mut Trainer) -> Result<()> {
    let Some(step) = trainer.pending_shards() else {
        return Ok(());
    };
    let dir = checkpoint_dir(root, step);
    let info = sharding_info(&dir)?
        .ok_or_else(|| LearnerError::state(&dir, format!("no {SHARDING_FILE}")))?;
    let (shard, optimizer, pending) = trainer.shard_parts_mut();
    let shard = shard.ok_or_else(|| {
        LearnerError::config("grpo.sharding", "a sharded checkpoint needs sharding on")
    })?;
    let (rank, world) = (shard.rank(), shard.world());
    if info.world_size != world {
        return Err(LearnerError::state(
            &dir,
            format!(
                "its optimizer is sharded over {} learner ranks, this learner has {world}: \
                 resume with {} ranks (shards are not re-split)",
                info.world_size, info.world_size
            ),
        ));
    }
    let path = shard_path(&dir, rank, world)?;
    let steps = shard.load(&path)?;
    if steps != info.optimizer_steps {
        return Err(LearnerError::state(
            &path,
            format!(
                "it is the shard after {steps} updates, the checkpoint's after {}",
                info.optimizer_steps
            ),
        ));
    }
    optimizer.set_steps(steps);
    *pending = None;
    Ok(())
}

/// [`SHARDING_FILE`] of the checkpoint `dir`, if it has one.
fn sharding_info(dir: &Path) -> Result<Option<ShardingInfo>> {
    let path = dir.join(SHARDING_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| LearnerError::io(&path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| LearnerError::state(&path, e.to_string()))
}

/// The shard file of `rank` of `world` for the checkpoint directory `dir`.
fn shard_path(dir: &Path, rank: usize, world: usize) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| LearnerError::state(dir, "not a checkpoint directory name"))?;
    Ok(dir
        .with_file_name(format!("{name}.{SHARDS_SUFFIX}"))
        .join(shard_file_name(rank, world)))
}

/// Restores `trainer` from the newest checkpoint under `root` that loads and whose state
/// `accept` takes (it reads the caller's part of the state), falling back to older ones
/// when a newer one is damaged: each failure is logged with its reason. `None` when
/// there is no checkpoint; the newest one's error when none loads.
pub fn load_newest<T>(
    root: &Path,
    trainer: &mut Trainer,
    accept: impl Fn(&Path, &TrainerState) -> Result<T>,
) -> Result<Option<(PathBuf, TrainerState, T)>> {
    if !root.exists() {
        return Ok(None);
    }
    let mut newest_error = None;
    for (_, dir) in checkpoints(root)?.into_iter().rev() {
        let loaded = load(&dir, trainer).and_then(|state| {
            let taken = accept(&dir, &state)?;
            Ok((state, taken))
        });
        match loaded {
            Ok((state, taken)) => return Ok(Some((dir, state, taken))),
            Err(e) => {
                tracing::warn!(
                    checkpoint = %dir.display(),
                    "cannot resume from this checkpoint, trying the one before: {e}"
                );
                newest_error.get_or_insert(e);
            }
        }
    }
    newest_error.map_or(Ok(None), Err)
}

/// The checkpoint with the highest step under `root`, if any. Scratch directories of
/// unfinished writes are ignored.
pub fn latest_checkpoint(root: &Path) -> Option<PathBuf> {
    checkpoints(root).ok()?.pop().map(|(_, dir)| dir)
}

/// Deletes all but the `keep` newest checkpoints under `root`, and scratch directories left
/// by other (crashed) processes; returns what was deleted.
pub fn prune(root: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    if keep == 0 {
        return Err(LearnerError::config(
            "keep",
            "must keep at least one checkpoint",
        ));
    }
    let all = checkpoints(root)?;
    let mut removed: Vec<PathBuf> = all
        .iter()
        .take(all.len().saturating_sub(keep))
        .map(|(_, dir)| dir.clone())
        .collect();
    let oldest_kept = all.get(all.len().saturating_sub(keep)).map(|c| c.0);
    for entry in read_dir(root)? {
        let name = entry.file_name();
        let owner = name.to_str().and_then(scratch_owner);
        if owner.is_some_and(|pid| pid != std::process::id()) {
            removed.push(entry.path());
        }
        let shards_of = name.to_str().and_then(shards_step);
        if let (Some(step), Some(oldest)) = (shards_of, oldest_kept) {
            if step < oldest {
                removed.push(entry.path());
            }
        }
    }
    for dir in &removed {
        remove_dir(dir)?;
    }
    Ok(removed)
}

/// Every finished checkpoint under `root` with its step, oldest first.
fn checkpoints(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found: Vec<(u64, PathBuf)> = read_dir(root)?
        .into_iter()
        .filter_map(|entry| {
            let name = entry.file_name();
            let digits = name.to_str()?.strip_prefix(PREFIX)?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let step = digits.parse().ok()?;
            entry.path().is_dir().then(|| (step, entry.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

fn read_dir(root: &Path) -> Result<Vec<std::fs::DirEntry>> {
    std::fs::read_dir(root)
        .and_then(|entries| entries.collect())
        .map_err(|e| LearnerError::io(root, e))
}

/// The step of a shard directory name (`step-N.shards`).
fn shards_step(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(PREFIX)?
        .strip_suffix(SHARDS_SUFFIX)?
        .strip_suffix('.')?;
    digits.parse().ok()
}

/// The pid in a scratch directory name (`step-N.tmp-<pid>-<n>` or `step-N.old-<pid>-<n>`).
fn scratch_owner(name: &str) -> Option<u32> {
    let (_, rest) = name.strip_prefix(PREFIX)?.split_once('.')?;
    let rest = rest
        .strip_prefix("tmp-")
        .or_else(|| rest.strip_prefix("old-"))?;
    rest.split_once('-')?.0.parse().ok()
}

/// `<dir>.<suffix>` next to `dir`.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir
        .file_name()
        .expect("checkpoint dirs have names")
        .to_owned();
    name.push(format!(".{suffix}"));
    dir.with_file_name(name)
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| LearnerError::io(to, e))
}

fn remove_dir(dir: &Path) -> Result<()> {
    std::fs::remove_dir_all(dir).map_err(|e| LearnerError::io(dir, e))
}

/// Flushes a file or directory to disk.
fn sync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| LearnerError::io(path, e))
}

/// Flushes every file of `dir` and the directory itself.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in read_dir(dir)? {
        sync(&entry.path())?;
    }
    sync(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Saves `trainer` as the checkpoint of its current step under `root`, as the trainer
    /// does (a snapshot, then the write).
    fn save(
        root: &Path,
        trainer: &mut Trainer,
        tokenizer_files: &[(&str, &[u8])],
        extra: Value,
    ) -> Result<PathBuf> {
        Snapshot::take(trainer, tokenizer_files, extra)?.write(root)
    }
    use crate::testing::{batch, tiny_model};
    use crate::train::trainer::TrainerConfig;
    use quill_model::Qwen2;
    use serde_json::json;
    use tch::Kind;

    fn trainer(seed: u64) -> Trainer {
        let mut config = TrainerConfig::default();
        config.optimizer.lr = 1e-2;
        Trainer::new(tiny_model(seed), None, config).unwrap()
    }

    fn same_weights(a: &Trainer, b: &Trainer) -> bool {
        a.model()
            .hf_tensors(Kind::Float)
            .iter()
            .zip(b.model().hf_tensors(Kind::Float))
            .all(|((n1, x), (n2, y))| *n1 == n2 && x.equal(&y))
    }

    #[test]
    fn round_trip_restores_everything() {
        let root = tempfile::tempdir().unwrap();
        let mut original = trainer(1);
        original.step(&batch()).unwrap();
        original.step(&batch()).unwrap();
        let extra = json!({"cursor": 17, "rng": [1, 2, 3]});
        let tokenizer: &[(&str, &[u8])] = &[("tokenizer.json", b"{}")];
        let dir = save(root.path(), &mut original, tokenizer, extra.clone()).unwrap();
        assert_eq!(dir, root.path().join("step-00000002"));
        assert_eq!(std::fs::read(dir.join("tokenizer.json")).unwrap(), b"{}");
        assert!(dir.join("config.json").exists() && dir.join(OPTIMIZER_FILE).exists());

        let mut restored = trainer(9);
        assert!(!same_weights(&original, &restored));
        let state = load(&dir, &mut restored).unwrap();
        assert_eq!(state.extra, extra);
        assert_eq!(state.progress, original.progress());
        assert_eq!(restored.progress(), original.progress());
        assert!(same_weights(&original, &restored));
        assert_eq!(restored.optimizer().steps(), 2);
        for ((n1, m1, v1), (n2, m2, v2)) in original
            .optimizer()
            .moments()
            .zip(restored.optimizer().moments())
        {
            assert!(
                n1 == n2 && m1.equal(m2) && v1.equal(v2),
                "{n1} moments differ"
            );
        }
        // Training on from the checkpoint is exactly training on without it.
        original.step(&batch()).unwrap();
        restored.step(&batch()).unwrap();
        assert!(same_weights(&original, &restored));
    }

    #[test]
    fn resume_falls_back_past_damaged_checkpoints() {
        let root = tempfile::tempdir().unwrap();
        let mut t = trainer(2);
        for _ in 0..3 {
            t.step(&batch()).unwrap();
            save(root.path(), &mut t, &[], Value::Null).unwrap();
        }
        let model = |step: u64| checkpoint_dir(root.path(), step).join("model.safetensors");
        let bytes = std::fs::read(model(3)).unwrap();
        std::fs::write(model(3), &bytes[..bytes.len() / 2]).unwrap();
        let accept_all = |_: &Path, _: &TrainerState| Ok(());
        let mut restored = trainer(2);
        let (dir, state, ()) = load_newest(root.path(), &mut restored, accept_all)
            .unwrap()
            .unwrap();
        assert_eq!(
            dir,
            checkpoint_dir(root.path(), 2),
            "the truncated newest is skipped"
        );
        assert_eq!((state.progress.step, restored.progress().step), (2, 2));
        let refuse_step_2 = |dir: &Path, state: &TrainerState| {
            if state.progress.step == 2 {
                Err(LearnerError::state(dir, "unreadable data state"))
            } else {
                Ok(())
            }
        };
        let (dir, _, ()) = load_newest(root.path(), &mut trainer(2), refuse_step_2)
            .unwrap()
            .unwrap();
        assert_eq!(dir, checkpoint_dir(root.path(), 1));
        std::fs::write(model(1), b"").unwrap();
        std::fs::write(model(2), b"").unwrap();
        let err = load_newest(root.path(), &mut trainer(2), accept_all).unwrap_err();
        assert!(err.to_string().contains("step-00000003"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let none = load_newest(&empty.path().join("absent"), &mut trainer(2), accept_all);
        assert!(none.unwrap().is_none());
    }

    #[test]
    fn unfinished_writes_are_ignored_and_pruned() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(latest_checkpoint(root.path()), None);
        let mut t = trainer(2);
        for _ in 0..3 {
            t.step(&batch()).unwrap();
            save(root.path(), &mut t, &[], Value::Null).unwrap();
        }
        let stale = root.path().join("step-00000009.tmp-4000000-0");
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("config.json"), "{").unwrap();
        let own = root
            .path()
            .join(format!("step-00000008.tmp-{}-99", std::process::id()));
        std::fs::create_dir(&own).unwrap();
        assert_eq!(
            latest_checkpoint(root.path()),
            Some(root.path().join("step-00000003"))
        );
        let mut removed = prune(root.path(), 2).unwrap();
        removed.sort();
        assert_eq!(removed, [root.path().join("step-00000001"), stale]);
        assert!(
            own.exists(),
            "a scratch dir of this process may still be in use"
        );
        assert!(root.path().join("step-00000002").exists());
        assert!(prune(root.path(), 0).is_err());
    }

    #[test]
    fn saving_the_same_step_again_replaces_it() {
        let root = tempfile::tempdir().unwrap();
        let mut t = trainer(3);
        save(root.path(), &mut t, &[], json!(1)).unwrap();
        let dir = save(root.path(), &mut t, &[], json!(2)).unwrap();
        let text = std::fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        let state: TrainerState = serde_json::from_str(&text).unwrap();
        assert_eq!(state.extra, json!(2));
        let names: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no scratch directories are left behind");
    }

    #[test]
    fn bad_tokenizer_names_and_missing_tensors_are_errors() {
        let root = tempfile::tempdir().unwrap();
        let mut t = trainer(4);
        let err = save(root.path(), &mut t, &[("../x", b"")], Value::Null).unwrap_err();
        assert!(err.to_string().contains("`../x`"), "{err}");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
        let dir = save(root.path(), &mut t, &[], Value::Null).unwrap();
        std::fs::remove_file(dir.join(OPTIMIZER_FILE)).unwrap();
        let mut other = trainer(5);
        let err = load(&dir, &mut other).unwrap_err().to_string();
        assert!(err.contains(OPTIMIZER_FILE), "{err}");
    }

    /// Rank `rank`'s shard of `global` (every `world`-th sample) with its weights.
    fn shard_of(
        global: &[crate::TrainSample],
        rank: usize,
        world: usize,
    ) -> (Vec<crate::TrainSample>, Vec<f64>) {
        let weights = crate::train::grpo::token_weights(global, crate::LossAggregation::TokenMean);
        global
            .iter()
            .cloned()
            .zip(weights)
            .enumerate()
            .filter(|(i, _)| i % world == rank)
            .map(|(_, pair)| pair)
            .unzip()
    }

    fn sharded_trainer(seed: u64) -> Trainer {
        let config = TrainerConfig {
            sharding: Sharding::Zero2,
            ..crate::testing::trainer_config(16, crate::LossAggregation::TokenMean, 0.5)
        };
        Trainer::new(tiny_model(seed), None, config).unwrap()
    }

    fn flat(trainer: &Trainer) -> Vec<f32> {
        trainer
            .optimizer()
            .params()
            .iter()
            .flat_map(|p| Vec::<f32>::try_from(p.reshape([-1])).unwrap())
            .collect()
    }

    fn join(
        ring: crate::parallel::collective::RingCollective,
    ) -> crate::train::grad_sync::GradSync {
        crate::train::grad_sync::GradSync::new(Box::new(ring), 700)
    }

    /// Each of `world` ZeRO-2 ranks' error on loading its shard of the checkpoint `dir`
    /// (rank 0 loads the model first).
    fn zero2_shard_errors(root: &Path, dir: &Path, world: usize) -> Vec<String> {
        use crate::parallel::collective::{on_loopback_ranks, Collective};
        on_loopback_ranks(world, std::time::Duration::from_secs(20), |ring| {
            let rank = ring.rank();
            let mut t = sharded_trainer(1);
            if rank == 0 {
                load(dir, &mut t).unwrap();
            }
            t.attach(join(ring)).unwrap();
            load_shard(root, &mut t).unwrap_err().to_string()
        })
    }

    #[test]
    fn a_sharded_checkpoint_resumes_exactly_on_the_same_ranks() {
        use crate::parallel::collective::{on_loopback_ranks, Collective};
        use std::time::Duration;
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let mut third = batch();
        third.iter_mut().for_each(|s| s.advantage = -s.advantage);
        let timeout = Duration::from_secs(20);
        let continued = on_loopback_ranks(2, timeout, |ring| {
            let rank = ring.rank();
            let mut t = sharded_trainer(1);
            t.attach(join(ring)).unwrap();
            for _ in 0..2 {
                let (shard, w) = shard_of(&batch(), rank, 2);
                t.step_shard(&shard, &w).unwrap();
                if rank == 0 {
                    save(root, &mut t, &[], json!({"rank": 0})).unwrap();
                } else {
                    ShardSnapshot::take(&t).unwrap().write(root).unwrap();
                }
            }
            let (shard, w) = shard_of(&third, rank, 2);
            t.step_shard(&shard, &w).unwrap();
            flat(&t)
        });
        assert!(checkpoint_dir(root, 1).exists() && shards_dir(root, 1).exists());
        prune(root, 1).unwrap();
        assert!(!checkpoint_dir(root, 1).exists() && !shards_dir(root, 1).exists());
        let dir = checkpoint_dir(root, 2);
        assert!(dir.join(SHARDING_FILE).exists() && !dir.join(OPTIMIZER_FILE).exists());
        for rank in 0..2 {
            assert!(shards_dir(root, 2).join(shard_file_name(rank, 2)).is_file());
        }

        let resumed = on_loopback_ranks(2, timeout, |ring| {
            let rank = ring.rank();
            let mut t = sharded_trainer(7 + rank as u64);
            if rank == 0 {
                load(&dir, &mut t).unwrap();
            }
            t.attach(join(ring)).unwrap();
            assert_eq!(t.pending_shards(), Some(2));
            load_shard(root, &mut t).unwrap();
            assert_eq!((t.progress().step, t.optimizer().steps()), (2, 2));
            let (shard, w) = shard_of(&third, rank, 2);
            t.step_shard(&shard, &w).unwrap();
            flat(&t)
        });
        assert_eq!(resumed, continued, "the resumed step is bit-equal");

        for err in zero2_shard_errors(root, &dir, 3) {
            assert!(
                err.contains("sharded over 2 learner ranks, this learner has 3"),
                "{err}"
            );
        }
        let err = load(&dir, &mut trainer(1)).unwrap_err().to_string();
        assert!(err.contains("sharded learner (2 ranks"), "{err}");
        let mut lone = sharded_trainer(1);
        load(&dir, &mut lone).unwrap();
        let err = lone.step(&batch()).unwrap_err().to_string();
        assert!(err.contains("were not loaded"), "{err}");
        let unsharded = save(root, &mut trainer(1), &[], Value::Null).unwrap();
        let err = load(&unsharded, &mut sharded_trainer(1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("grpo.sharding = \"none\""), "{err}");
        std::fs::remove_file(shards_dir(root, 2).join(shard_file_name(1, 2))).unwrap();
        let err = load(&dir, &mut sharded_trainer(1)).unwrap_err().to_string();
        assert!(err.contains("shard of rank 1 is missing"), "{err}");
    }

    #[test]
    fn a_zero3_checkpoint_holds_the_whole_model_and_resumes_exactly() {
        use crate::parallel::collective::{on_loopback_ranks, Collective};
        use std::time::Duration;
        let zero3 = |seed: u64| {
            let config = TrainerConfig {
                sharding: Sharding::Zero3,
                ..crate::testing::trainer_config(16, crate::LossAggregation::TokenMean, 0.5)
            };
            Trainer::new(tiny_model(seed), None, config).unwrap()
        };
        let gathered = |t: &mut Trainer| -> Vec<(String, Vec<f32>)> {
            let mut w = t.full_weights(Kind::Float).unwrap();
            w.sort_by(|a, b| a.0.cmp(&b.0));
            w.into_iter()
                .map(|(n, t)| (n, Vec::<f32>::try_from(t.reshape([-1])).unwrap()))
                .collect()
        };
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let mut third = batch();
        third.iter_mut().for_each(|s| s.advantage = -s.advantage);
        let timeout = Duration::from_secs(20);
        let continued = on_loopback_ranks(2, timeout, |ring| {
            let rank = ring.rank();
            let mut t = zero3(1);
            t.attach(join(ring)).unwrap();
            for _ in 0..2 {
                let (shard, w) = shard_of(&batch(), rank, 2);
                t.step_shard(&shard, &w).unwrap();
            }
            let saved = gathered(&mut t);
            if rank == 0 {
                save(root, &mut t, &[], json!({"rank": 0})).unwrap();
            } else {
                t.full_weights(Kind::Float).unwrap();
                ShardSnapshot::take(&t).unwrap().write(root).unwrap();
            }
            let (shard, w) = shard_of(&third, rank, 2);
            t.step_shard(&shard, &w).unwrap();
            (saved, gathered(&mut t))
        });
        let dir = checkpoint_dir(root, 2);
        let folder = Qwen2::load(&dir, tch::Device::Cpu, Kind::Float).unwrap();
        let mut on_disk: Vec<(String, Vec<f32>)> = folder
            .hf_tensors(Kind::Float)
            .into_iter()
            .map(|(n, t)| (n, Vec::<f32>::try_from(t.reshape([-1])).unwrap()))
            .collect();
        on_disk.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            on_disk, continued[0].0,
            "the model folder holds every layer"
        );
        assert!(on_disk
            .iter()
            .any(|(n, _)| n.starts_with("model.layers.1.")));

        let resumed = on_loopback_ranks(2, timeout, |ring| {
            let rank = ring.rank();
            let mut t = zero3(7 + rank as u64);
            if rank == 0 {
                load(&dir, &mut t).unwrap();
            }
            t.attach(join(ring)).unwrap();
            load_shard(root, &mut t).unwrap();
            let (shard, w) = shard_of(&third, rank, 2);
            t.step_shard(&shard, &w).unwrap();
            gathered(&mut t)
        });
        for rank in 0..2 {
            assert_eq!(resumed[rank], continued[rank].1, "rank {rank}: bit-equal");
        }

        for err in zero2_shard_errors(root, &dir, 2) {
            assert!(
                err.contains("resume with the sharding that wrote it"),
                "{err}"
            );
        }
    }
}

//! The Bradley–Terry training loop: batches of pairs split over the ranks and into
//! micro-batches, one AdamW update per batch, a held-out evaluation after every epoch,
//! checkpoints, and a clean stop on request.

use super::checkpoint::{self, Progress, OPTIMIZER_FILE};
use super::init::ModelSource;
use super::pairs::PreferencePair;
use super::{Result, RmError};
use crate::parallel::collective::{Collective, ReduceOp};
use crate::{AdamW, AdamWConfig, LrSchedule};
use quill_model::checkpoint::CheckpointReader;
use quill_model::{Qwen2, Tokenizer};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Reward-model training settings (each field is a `quill train-rm` flag).
#[derive(Debug, Clone, PartialEq)]
pub struct RmConfig {
    /// Pairs per forward pass on one rank (`--micro-batch`).
    pub micro_batch: usize,
    /// Micro-batches per update on one rank (`--accumulation`).
    pub accumulation: usize,
    /// Passes over the training pairs (`--epochs`).
    pub epochs: u32,
    /// Peak learning rate (`--lr`).
    pub lr: f64,
    /// Learning rate at the end of the cosine decay (`--min-lr`).
    pub min_lr: f64,
    /// Linear warm-up updates (`--warmup-steps`).
    pub warmup_steps: u64,
    /// AdamW's decoupled weight decay (`--weight-decay`).
    pub weight_decay: f64,
    /// Clip the gradient norm to this (`--max-grad-norm`; `None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Tokens kept of each text (`--max-length`; the model's context bounds it too).
    pub max_length: usize,
    /// Seed of the data order and the new score head (`--seed`).
    pub seed: u64,
    /// Write a checkpoint every this many updates (`--save-every`; 0: at epoch ends only).
    pub save_every: u64,
    /// Checkpoints kept (`--keep-checkpoints`).
    pub keep_checkpoints: usize,
}

impl Default for RmConfig {
    fn default() -> Self {
        RmConfig {
            micro_batch: 4,
            accumulation: 1,
            epochs: 1,
            lr: 1e-5,
            min_lr: 0.0,
            warmup_steps: 0,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            max_length: 1024,
            seed: 0,
            save_every: 0,
            keep_checkpoints: 2,
        }
    }
}

/// One update, as every rank sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Updates done, this one included.
    pub step: u64,
    /// Updates of the whole run.
    pub total_steps: u64,
    /// The epoch (0-based).
    pub epoch: u32,
    /// Mean Bradley–Terry loss of the batch.
    pub loss: f64,
    /// Share of the batch's pairs ranked right.
    pub accuracy: f64,
    /// Learning rate of the update.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

/// An epoch's training and held-out numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochReport {
    /// The epoch (0-based).
    pub epoch: u32,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Training pair accuracy over the epoch.
    pub train_accuracy: f64,
    /// Mean held-out loss (`None` without held-out pairs).
    pub eval_loss: Option<f64>,
    /// Held-out pair accuracy (`None` without held-out pairs).
    pub eval_accuracy: Option<f64>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every epoch done; the model is in this folder.
    Finished(PathBuf),
    /// Stopped on request; this checkpoint resumes it.
    Interrupted(PathBuf),
}

/// A pair as token ids: (chosen text, rejected text).
type TokenPair = (Vec<i64>, Vec<i64>);

/// A reward model, its optimizer and data, on one rank.
pub struct RmTrainer {
    model: Qwen2,
    source: ModelSource,
    optimizer: AdamW,
    config: RmConfig,
    train: Vec<TokenPair>,
    eval: Vec<TokenPair>,
    collective: Option<Box<dyn Collective>>,
    progress: Progress,
    steps_per_epoch: u64,
}

fn check(ok: bool, field: &str, reason: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(RmError::config(field, reason()))
    }
}

impl RmTrainer {
    /// A trainer for `model` (a one-label reward model) on tokenized `train` and `eval`
    /// pairs; with a `collective` of several ranks, rank 0's weights are copied to all.
    pub fn new(
        model: Qwen2,
        tokenizer: &Tokenizer,
        source: ModelSource,
        train: &[PreferencePair],
        eval: &[PreferencePair],
        config: RmConfig,
        collective: Option<Box<dyn Collective>>,
    ) -> Result<Self> {
        check(config.micro_batch > 0, "--micro-batch", || {
            "must be at least 1".into()
        })?;
        check(config.accumulation > 0, "--accumulation", || {
            "must be at least 1".into()
        })?;
        check(config.epochs > 0, "--epochs", || {
            "must be at least 1".into()
        })?;
        check(config.max_length > 0, "--max-length", || {
            "must be at least 1".into()
        })?;
        check(!train.is_empty(), "--eval-fraction", || {
            "leaves no training pairs".into()
        })?;
        let world = collective.as_ref().map_or(1, |c| c.world_size());
        let global = config.micro_batch * config.accumulation * world;
        let steps_per_epoch = train.len().div_ceil(global) as u64;
        let total = steps_per_epoch * u64::from(config.epochs);
        check(config.warmup_steps < total, "--warmup-steps", || {
            format!(
                "must be below the run's {total} updates ({} pairs, {global} per update, {} epochs)",
                train.len(),
                config.epochs
            )
        })?;
        let optimizer_config = AdamWConfig {
            lr: config.lr,
            weight_decay: config.weight_decay,
            max_grad_norm: config.max_grad_norm,
            schedule: LrSchedule::Cosine {
                warmup_steps: config.warmup_steps,
                total_steps: total,
                min_lr: config.min_lr,
            },
            ..AdamWConfig::default()
        };
        let optimizer = AdamW::new(model.var_store(), optimizer_config).map_err(|e| match e {
            crate::LearnerError::Config { field, reason } => {
                RmError::config(format!("--{}", field.replace('_', "-")), reason)
            }
            other => other.into(),
        })?;
        let context = (model.config().max_position_embeddings as usize).min(config.max_length);
        let encode = |text: String| -> Result<Vec<i64>> {
            let mut ids = tokenizer.encode(&text)?;
            ids.truncate(context);
            if ids.is_empty() {
                ids.push(0);
            }
            Ok(ids)
        };
        let tokenize = |pairs: &[PreferencePair]| -> Result<Vec<TokenPair>> {
            pairs
                .iter()
                .map(|p| Ok((encode(p.text(&p.chosen))?, encode(p.text(&p.rejected))?)))
                .collect()
        };
        let mut trainer = RmTrainer {
            train: tokenize(train)?,
            eval: tokenize(eval)?,
            progress: Progress {
                train_pairs: train.len(),
                eval_pairs: eval.len(),
                ..Progress::default()
            },
            model,
            source,
            optimizer,
            config,
            collective,
            steps_per_epoch,
        };
        trainer.sync_weights()?;
        Ok(trainer)
    }

    /// Copies rank 0's weights to every rank.
    fn sync_weights(&mut self) -> Result<()> {
        let Some(collective) = self.collective.as_mut() else {
            return Ok(());
        };
        let _guard = tch::no_grad_guard();
        let mut vars: Vec<(String, Tensor)> =
            self.model.var_store().variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, mut var) in vars {
            collective.broadcast(&mut var, 0)?;
        }
        Ok(())
    }

    /// Continues from a checkpoint written by this trainer's run: weights, optimizer and
    /// position. The data must have the same number of pairs.
    pub fn resume(&mut self, dir: &Path) -> Result<()> {
        let saved = checkpoint::read_progress(dir)?;
        if (saved.train_pairs, saved.eval_pairs) != (self.train.len(), self.eval.len()) {
            return Err(RmError::Checkpoint {
                path: dir.to_owned(),
                reason: format!(
                    "it was made with {} training and {} held-out pairs, this run has {} and {} \
                     (different data, --eval-fraction or --seed)",
                    saved.train_pairs,
                    saved.eval_pairs,
                    self.train.len(),
                    self.eval.len()
                ),
            });
        }
        let reader = CheckpointReader::open(dir)?;
        self.model.load_weights(&reader)?;
        self.optimizer.load(&dir.join(OPTIMIZER_FILE))?;
        self.progress = saved;
        Ok(())
    }

    /// The model being trained.
    pub fn model(&self) -> &Qwen2 {
        &self.model
    }

    /// Where training stands.
    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// The learning rate of the next update.
    pub fn next_lr(&self) -> f64 {
        self.optimizer.next_lr()
    }

    /// Updates of the whole run.
    pub fn total_steps(&self) -> u64 {
        self.steps_per_epoch * u64::from(self.config.epochs)
    }

    fn rank_and_world(&self) -> (usize, usize) {
        self.collective
            .as_ref()
            .map_or((0, 1), |c| (c.rank(), c.world_size()))
    }

    /// This rank's contiguous share of `items`.
    fn share<'a, T>(&self, items: &'a [T]) -> &'a [T] {
        let (rank, world) = self.rank_and_world();
        let n = items.len();
        &items[rank * n / world..(rank + 1) * n / world]
    }

    /// Scores the chosen and rejected texts of `pairs`: the margins `r_c − r_r`.
    fn margins(&self, pairs: &[&TokenPair]) -> Result<Tensor> {
        let rows: Vec<Vec<i64>> = pairs
            .iter()
            .map(|p| p.0.clone())
            .chain(pairs.iter().map(|p| p.1.clone()))
            .collect();
        let scores = self.model.classify(&rows)?.select(1, 0);
        let m = pairs.len() as i64;
        Ok(scores.narrow(0, 0, m) - scores.narrow(0, m, m))
    }

    /// Sums `values` over the ranks.
    fn reduce(&mut self, values: &mut Tensor) -> Result<()> {
        if let Some(collective) = self.collective.as_mut() {
            collective.all_reduce(values, ReduceOp::Sum)?;
        }
        Ok(())
    }

    /// One update on the batch of training pairs `batch` (indices into the training
    /// pairs, the whole batch over all ranks); `stop` is this rank's request to stop.
    /// Returns the report and whether any rank asked to stop.
    pub fn train_step(&mut self, batch: &[usize], stop: bool) -> Result<(StepReport, bool)> {
        self.optimizer.zero_grad();
        let global = batch.len() as f64;
        let mine: Vec<&TokenPair> = self.share(batch).iter().map(|&i| &self.train[i]).collect();
        let (mut loss_sum, mut correct) = (0.0, 0.0);
        for micro in mine.chunks(self.config.micro_batch) {
            let margins = self.margins(micro)?;
            let losses = -margins.log_sigmoid();
            (losses.sum(Kind::Float) / global).backward();
            loss_sum += losses.sum(Kind::Double).double_value(&[]);
            correct += margins.gt(0.0).sum(Kind::Double).double_value(&[]);
        }
        if mine.is_empty() {
            // Every gradient must be defined for the sum over ranks: a zero-weight pass.
            (self.model.classify(&[vec![0]])?.sum(Kind::Float) * 0.0).backward();
        }
        let params = self.optimizer.params();
        let stats = [loss_sum, correct, f64::from(u8::from(stop))];
        if self.collective.is_some() {
            let _guard = tch::no_grad_guard();
            let device = self.model.device();
            let mut parts: Vec<Tensor> = params.iter().map(|p| p.grad().reshape([-1])).collect();
            parts.push(
                Tensor::from_slice(&stats)
                    .to_kind(Kind::Float)
                    .to_device(device),
            );
            let mut flat = Tensor::cat(&parts, 0);
            self.reduce(&mut flat)?;
            let mut offset = 0;
            for p in &params {
                let mut g = p.grad();
                let n = g.numel() as i64;
                g.copy_(&flat.narrow(0, offset, n).view_as(&g));
                offset += n;
            }
            let summed = Vec::<f64>::try_from(
                flat.narrow(0, offset, 3)
                    .to_kind(Kind::Double)
                    .to_device(Device::Cpu),
            )?;
            loss_sum = summed[0];
            correct = summed[1];
            return self.finish_step(loss_sum, correct, global, summed[2] > 0.0);
        }
        self.finish_step(loss_sum, correct, global, stop)
    }

    fn finish_step(
        &mut self,
        loss_sum: f64,
        correct: f64,
        global: f64,
        stop: bool,
    ) -> Result<(StepReport, bool)> {
        let grad_norm = self.optimizer.clip_grad_norm()?;
        if !grad_norm.is_finite() || !loss_sum.is_finite() {
            return Err(RmError::config(
                "--lr",
                format!(
                    "update {} got a non-finite loss or gradient norm; lower the learning rate",
                    self.progress.step + 1
                ),
            ));
        }
        let lr = self.optimizer.step()?;
        let p = &mut self.progress;
        p.step += 1;
        p.batch += 1;
        p.epoch_loss += loss_sum;
        p.epoch_correct += correct;
        p.epoch_pairs += global;
        let report = StepReport {
            step: p.step,
            total_steps: self.steps_per_epoch * u64::from(self.config.epochs),
            epoch: p.epoch,
            loss: loss_sum / global,
            accuracy: correct / global,
            lr,
            grad_norm,
        };
        Ok((report, stop))
    }

    /// Mean Bradley–Terry loss and pair accuracy on the held-out pairs, over all ranks;
    /// `None` when there are none.
    pub fn evaluate(&mut self) -> Result<Option<(f64, f64)>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let (loss, correct) = {
            let _guard = tch::no_grad_guard();
            let mine: Vec<&TokenPair> = self.share(&self.eval).iter().collect();
            let (mut loss, mut correct) = (0.0, 0.0);
            for micro in mine.chunks(self.config.micro_batch) {
                let margins = self.margins(micro)?;
                loss += (-margins.log_sigmoid()).sum(Kind::Double).double_value(&[]);
                correct += margins.gt(0.0).sum(Kind::Double).double_value(&[]);
            }
            (loss, correct)
        };
        let mut sums = Tensor::from_slice(&[loss, correct])
            .to_kind(Kind::Float)
            .to_device(self.model.device());
        self.reduce(&mut sums)?;
        let sums = Vec::<f64>::try_from(sums.to_kind(Kind::Double).to_device(Device::Cpu))?;
        let n = self.eval.len() as f64;
        Ok(Some((sums[0] / n, sums[1] / n)))
    }

    /// The order of the training pairs in `epoch`.
    fn epoch_order(&self, epoch: u32) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        let seed = self.config.seed ^ (u64::from(epoch) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        order
    }

    fn is_root(&self) -> bool {
        self.rank_and_world().0 == 0
    }

    fn save_checkpoint(&self, out: &Path) -> Result<Option<PathBuf>> {
        if !self.is_root() {
            return Ok(None);
        }
        checkpoint::save(
            out,
            &self.model,
            &self.source,
            &self.optimizer,
            &self.progress,
            self.config.keep_checkpoints,
        )
        .map(Some)
    }

    /// Trains from where the trainer stands to the last epoch, writing checkpoints,
    /// `metrics.jsonl` and finally the model (rank 0) under `out`. `stop` is polled after
    /// every update; when any rank's returns true, a checkpoint is written and the run ends.
    pub fn run(
        &mut self,
        out: &Path,
        stop: &dyn Fn() -> bool,
        on_step: &mut dyn FnMut(&StepReport),
        on_epoch: &mut dyn FnMut(&EpochReport),
    ) -> Result<Outcome> {
        let global = self.config.micro_batch * self.config.accumulation * self.rank_and_world().1;
        while self.progress.epoch < self.config.epochs {
            let order = self.epoch_order(self.progress.epoch);
            let batches: Vec<&[usize]> = order.chunks(global).collect();
            while self.progress.batch < batches.len() {
                let (report, stopping) = self.train_step(batches[self.progress.batch], stop())?;
                on_step(&report);
                let every = self.config.save_every;
                if stopping {
                    let dir = self.save_checkpoint(out)?;
                    return Ok(Outcome::Interrupted(
                        dir.unwrap_or_else(|| out.join("checkpoints")),
                    ));
                }
                if every > 0 && self.progress.step % every == 0 {
                    self.save_checkpoint(out)?;
                }
            }
            let evaluated = self.evaluate()?;
            let p = self.progress;
            let report = EpochReport {
                epoch: p.epoch,
                train_loss: p.epoch_loss / p.epoch_pairs.max(1.0),
                train_accuracy: p.epoch_correct / p.epoch_pairs.max(1.0),
                eval_loss: evaluated.map(|e| e.0),
                eval_accuracy: evaluated.map(|e| e.1),
            };
            on_epoch(&report);
            if self.is_root() {
                append_metrics(out, &report, p.step)?;
            }
            self.progress = Progress {
                epoch: p.epoch + 1,
                batch: 0,
                epoch_loss: 0.0,
                epoch_correct: 0.0,
                epoch_pairs: 0.0,
                ..p
            };
            self.save_checkpoint(out)?;
        }
        let dir = out.join("final");
        if self.is_root() {
            checkpoint::write_model(&dir, &self.model, &self.source)?;
        }
        Ok(Outcome::Finished(dir))
    }
}

/// Appends an epoch's numbers to `out/metrics.jsonl`.
fn append_metrics(out: &Path, report: &EpochReport, step: u64) -> Result<()> {
    let path = out.join("metrics.jsonl");
    let line = serde_json::json!({
        "epoch": report.epoch,
        "step": step,
        "train_loss": report.train_loss,
        "train_accuracy": report.train_accuracy,
        "eval_loss": report.eval_loss,
        "eval_accuracy": report.eval_accuracy,
    });
    std::fs::create_dir_all(out)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
        })
        .and_then(|mut f| writeln!(f, "{line}"))
        .map_err(|e| RmError::Checkpoint {
            path: path.clone(),
            reason: e.to_string(),
        })
}

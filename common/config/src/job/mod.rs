//! The job file: one TOML file that describes a whole RL job.
//!
//! Every section and field has a default; the defaults reproduce the LongWriter-Zero
//! recipe (see `docs/ARCHITECTURE.md`), except `job.name`, which every job file must
//! set. `configs/longwriter-zero.toml` and `configs/default.toml` are commented
//! examples of every field. [`JobConfig::from_file`] parses and validates a file;
//! every error names the file and the field, as in
//! `job.toml: grpo.eps_low: must be in [0, 1), got 1.5`. Unknown keys are rejected,
//! and TOML syntax errors give the line and column.

mod judge;
mod sections;
mod span;
#[cfg(test)]
mod tests;
mod validate;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::de::DeTable;

use crate::template::PromptTemplate;

pub use judge::{JudgeMode, JudgeParse, JudgeSection};
pub use sections::{
    CheckpointSection, ClusterSection, CollectiveKind, DataSection, GrpoSection, JobSection,
    KlEstimator, LossAggregation, LrSchedule, MetricsSection, ModelSection, OptimizerSection,
    ParallelSection, Precision, RangePredictorSection, RewardsSection, SamplingSection, Sharding,
    TlsSection, MAX_RELAY_FANOUT, MAX_WEIGHT_CHUNK_BYTES, MIN_WEIGHT_CHUNK_BYTES,
};

/// A whole RL job, as one TOML file describes it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobConfig {
    /// The job's identity, output folder, seed and token.
    pub job: JobSection,
    /// The policy being trained.
    pub model: ModelSection,
    /// The training prompts.
    pub data: DataSection,
    /// The prompt template (`[template]`, optional; the recipe's by default).
    pub template: PromptTemplate,
    /// How actors sample responses.
    pub sampling: SamplingSection,
    /// The reward signals and how they combine.
    pub rewards: RewardsSection,
    /// The GRPO objective and the training schedule.
    pub grpo: GrpoSection,
    /// AdamW and the learning-rate schedule.
    pub optimizer: OptimizerSection,
    /// Saved checkpoints and published weights.
    pub checkpoint: CheckpointSection,
    /// Addresses, process counts, queues and timeouts.
    pub cluster: ClusterSection,
    /// Where metrics go and how often.
    pub metrics: MetricsSection,
    /// How learner ranks train together (data parallelism).
    pub parallel: ParallelSection,
}

/// A job file that cannot be read, parsed or used.
#[derive(Debug, thiserror::Error)]
pub enum JobConfigError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The text is not TOML.
    #[error("{origin}: {message}")]
    Parse {
        /// The file (or other source) of the text.
        origin: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A field is unknown, of the wrong type, or out of its domain.
    #[error("{origin}: {field}: {reason}")]
    Invalid {
        /// The file (or other source) of the text.
        origin: String,
        /// The field's dotted path, such as `grpo.eps_low` or `cluster.reward_addrs[1]`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl JobConfig {
    /// Reads, parses and validates the job file at `path`; errors name the path.
    pub fn from_file(path: &Path) -> Result<Self, JobConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| JobConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::from_toml_str(&text, &path.display().to_string())?;
        config.load_template_file(path.parent().unwrap_or(Path::new(".")), path)?;
        Ok(config)
    }

    /// Replaces the template with the one in `template.file` (relative to `base`), if set.
    fn load_template_file(&mut self, base: &Path, origin: &Path) -> Result<(), JobConfigError> {
        let Some(file) = self.template.file.clone() else {
            return Ok(());
        };
        let loaded =
            PromptTemplate::from_file(&base.join(&file)).map_err(|e| JobConfigError::Invalid {
                origin: origin.display().to_string(),
                field: "template.file".into(),
                reason: e.to_string(),
            })?;
        self.template = PromptTemplate {
            file: Some(file),
            ..loaded
        };
        Ok(())
    }

    /// Parses and validates a job file's text; errors name `origin` (the file's name).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, JobConfigError> {
        let root = DeTable::parse(text).map_err(|e| JobConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let config: JobConfig = toml::from_str(text).map_err(|e| {
            let located = e.span().and_then(|span| {
                let mut path = String::new();
                span::find_in_table(root.get_ref(), &span, &mut path).then_some((path, span))
            });
            match located {
                Some((field, span)) => {
                    let (line, column) = span::line_and_column(text, span.start);
                    JobConfigError::Invalid {
                        origin: origin.to_owned(),
                        field,
                        reason: format!("{} (line {line}, column {column})", e.message()),
                    }
                }
                None => JobConfigError::Parse {
                    origin: origin.to_owned(),
                    message: e.to_string().trim_end().to_owned(),
                },
            }
        })?;
        config.check().map_err(|problem| problem.at(origin))?;
        Ok(config)
    }
}

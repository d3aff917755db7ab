//! Tests of loading job files: the example files, the defaults, TOML names and round
//! trips, syntax errors; and the helpers the validation and span tests share.

use std::path::{Path, PathBuf};

use quill_reward::{AdvantageMode, FormatConfig};

use super::*;
use crate::template::DEFAULT_STOP_STRINGS;

const RECIPE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../configs/longwriter-zero.toml"
));
const LOCAL: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../configs/default.toml"
));

/// The (field, reason) of an `Invalid` error, failing the test on any other result.
pub(super) fn invalid(text: &str) -> (String, String) {
    match JobConfig::from_toml_str(text, "job.toml") {
        Err(JobConfigError::Invalid {
            origin,
            field,
            reason,
        }) => {
            assert_eq!(origin, "job.toml");
            (field, reason)
        }
        other => panic!("expected an Invalid error for {text:?}, got {other:?}"),
    }
}

/// A minimal job file with `extra` appended.
pub(super) fn job(extra: &str) -> String {
    format!("[job]\nname = \"x\"\n{extra}")
}

#[test]
fn the_recipe_example_parses_and_validates() {
    let config = JobConfig::from_toml_str(RECIPE, "longwriter-zero.toml").unwrap();
    assert_eq!(config.job.name, "longwriter-zero");
    assert_eq!(config.model.path, "/models/Qwen2.5-32B-base");
    assert_eq!(config.model.device, "cuda");
    assert_eq!(config.model.dtype, "bf16");
    assert_eq!(config.sampling.group_size, 32);
    assert_eq!(config.sampling.temperature, 0.8);
    assert_eq!(config.sampling.top_p, 1.0);
    assert_eq!(config.sampling.max_new_tokens, 14_000);
    assert_eq!(config.sampling.stop, DEFAULT_STOP_STRINGS);
    assert_eq!(config.grpo.eps_low, 0.2);
    assert_eq!(config.grpo.eps_high, 0.2);
    assert_eq!(config.grpo.kl_coef, 0.0);
    assert_eq!(config.grpo.steps, 150);
    assert_eq!(config.rewards.combine, AdvantageMode::AdvantageAverage);
    assert_eq!(config.rewards.l_max, 12_000);
    assert!(config.rewards.quality_model.is_some());
    assert_eq!(config.template, PromptTemplate::default());
    // The recipe file spells out the defaults, apart from what names the job and
    // its machines.
    let defaults = JobConfig::default();
    assert_eq!(config.sampling, defaults.sampling);
    assert_eq!(config.grpo, defaults.grpo);
    assert_eq!(config.optimizer, defaults.optimizer);
    assert_eq!(config.checkpoint, defaults.checkpoint);
    assert_eq!(config.rewards.format, defaults.rewards.format);
}

#[test]
fn the_local_example_parses_and_validates() {
    let config = JobConfig::from_toml_str(LOCAL, "default.toml").unwrap();
    assert_eq!(config.job.name, "default");
    assert_eq!(config.job.output_dir, PathBuf::from("runs/default"));
    assert_eq!(config.model.path, "default");
    assert_eq!(config.model.device, "cpu");
    assert_eq!(config.data.path, "default");
    assert_eq!(config.sampling.group_size, 8);
    assert_eq!(config.sampling.max_new_tokens, 160);
    assert_eq!(config.grpo.prompts_per_step, 2);
    assert_eq!(config.grpo.steps, 150);
    assert_eq!(config.optimizer.lr, 2e-3);
    assert_eq!(config.optimizer.warmup_steps, 0);
    assert_eq!(config.rewards.l_max, 400);
    assert_eq!(config.rewards.quality_model, None);
    assert_eq!(config.cluster.actors, 2);
    assert_eq!(config.cluster.reward_workers, 1);
    assert_eq!(config.cluster.actor_batch, 16);
    assert_eq!(config.checkpoint.every_steps, 20);
    assert_eq!(config.cluster.learner_addr, "127.0.0.1:50051");
    assert_eq!(config.template.response_prefix, " <think> </think><answer>");
}

#[test]
fn the_example_files_load_from_disk() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../configs/default.toml"
    ));
    let config = JobConfig::from_file(path).unwrap();
    assert_eq!(config.sampling.group_size, 8);
    let missing = Path::new("/nonexistent/quill/job.toml");
    let err = JobConfig::from_file(missing).unwrap_err();
    assert!(matches!(err, JobConfigError::Io { ref path, .. } if path == missing));
    assert!(
        err.to_string().starts_with("/nonexistent/quill/job.toml: "),
        "{err}"
    );
}

#[test]
fn a_minimal_file_gets_the_recipe_defaults() {
    let config = JobConfig::from_toml_str("[job]\nname = \"x\"", "job.toml").unwrap();
    let want = JobConfig {
        job: JobSection {
            name: "x".to_owned(),
            ..JobSection::default()
        },
        ..JobConfig::default()
    };
    assert_eq!(config, want);
    assert_eq!(config.job.output_dir, PathBuf::from("runs"));
    assert_eq!(config.job.token_file, None);
    assert_eq!(config.model.path, "default");
    assert_eq!(config.data.question_field, "question");
    assert_eq!(config.data.range_field, "length_range");
    assert!(config.data.shuffle);
    assert_eq!(config.data.epochs, 0);
    assert_eq!(config.sampling.group_size, 32);
    assert_eq!(config.sampling.temperature, 0.8);
    assert_eq!(config.sampling.top_p, 1.0);
    assert_eq!(config.sampling.top_k, 0);
    assert_eq!(config.sampling.max_new_tokens, 14_000);
    assert_eq!(
        config.sampling.stop,
        ["<|user|>", "<|endoftext|>", "</answer>"]
    );
    assert_eq!(
        (
            config.rewards.length_weight,
            config.rewards.format_weight,
            config.rewards.quality_weight
        ),
        (1.0, 1.0, 1.0)
    );
    assert_eq!(config.rewards.combine, AdvantageMode::AdvantageAverage);
    assert_eq!(config.rewards.l_max, 12_000);
    assert_eq!(config.rewards.quality_batch_size, 8);
    assert_eq!(config.rewards.format, FormatConfig::default());
    assert_eq!(config.grpo.eps_low, 0.2);
    assert_eq!(config.grpo.eps_high, 0.2);
    assert_eq!(config.grpo.loss_aggregation, LossAggregation::TokenMean);
    assert_eq!(config.grpo.kl_coef, 0.0);
    assert_eq!(config.grpo.kl_estimator, KlEstimator::K3);
    assert_eq!(config.grpo.tis_cap, None);
    assert_eq!(config.grpo.max_staleness, 1);
    assert!(config.grpo.drop_zero_advantage_groups);
    assert_eq!(config.grpo.steps, 150);
    assert_eq!(config.grpo.micro_batch_tokens, 8192);
    assert_eq!(config.grpo.logprob_chunk_tokens, 1024);
    assert!(!config.grpo.activation_checkpointing);
    assert_eq!(config.grpo.sharding, crate::job::Sharding::None);
    assert_eq!(config.grpo.precision, Precision::F32);
    assert!(config.grpo.packing);
    assert_eq!(config.optimizer.lr, 1e-6);
    assert_eq!(config.optimizer.betas, [0.9, 0.999]);
    assert_eq!(config.optimizer.eps, 1e-8);
    assert_eq!(config.optimizer.weight_decay, 0.01);
    assert_eq!(config.optimizer.schedule, LrSchedule::Constant);
    assert_eq!(config.optimizer.max_grad_norm, 1.0);
    assert_eq!(config.optimizer.max_consecutive_bad_steps, 3);
    assert_eq!(config.checkpoint.every_steps, 50);
    assert_eq!(config.checkpoint.keep, 3);
    assert_eq!(config.checkpoint.publish_dtype, "bf16");
    assert_eq!(config.cluster.learner_addr, "127.0.0.1:50051");
    assert!(config.cluster.reward_addrs.is_empty());
    assert_eq!(config.cluster.actor_batch, 32);
    assert_eq!(config.cluster.leases_per_actor, 2);
    assert_eq!(config.cluster.lease_seconds, 600);
    assert_eq!(config.cluster.max_lease_seconds, 3600);
    assert_eq!(config.cluster.ingest_queue, 64);
    assert_eq!(config.cluster.weight_chunk_bytes, 4 << 20);
    assert_eq!(config.cluster.relay_fanout, 2);
    assert_eq!(config.cluster.heartbeat_seconds, 2.0);
    assert_eq!(config.cluster.rpc_timeout_seconds, 30.0);
    assert_eq!(config.metrics.jsonl, PathBuf::from("metrics.jsonl"));
    assert_eq!(config.metrics.log_every_seconds, 5.0);
    assert_eq!(config.metrics.prometheus_addr, None);
    assert_eq!(config.metrics.member_prometheus_addr, None);
    assert_eq!(config.metrics.peak_tflops, None);
}

#[test]
fn enums_and_options_are_read_by_their_toml_names() {
    let text = job(
        "[grpo]\nloss_aggregation = \"sequence_mean\"\nkl_estimator = \"k1\"\n\
         tis_cap = 2.0\nprecision = \"bf16\"\npacking = false\n[optimizer]\nschedule = \"cosine\"\n\
         [rewards]\ncombine = \"weighted_sum\"\nquality_model = \"/models/rm\"\n\
         [rewards.format]\nngram_penalty = 0.5\n[metrics]\nprometheus_addr = \"0.0.0.0:9090\"\n\
         member_prometheus_addr = \"0.0.0.0:0\"\npeak_tflops = 989.0\n",
    );
    let config = JobConfig::from_toml_str(&text, "job.toml").unwrap();
    assert_eq!(config.grpo.loss_aggregation, LossAggregation::SequenceMean);
    assert_eq!(config.grpo.kl_estimator, KlEstimator::K1);
    assert_eq!(config.grpo.tis_cap, Some(2.0));
    assert_eq!(config.grpo.precision, Precision::Bf16);
    assert!(!config.grpo.packing);
    assert_eq!(config.optimizer.schedule, LrSchedule::Cosine);
    assert_eq!(config.rewards.combine, AdvantageMode::WeightedSum);
    assert_eq!(config.rewards.quality_model.as_deref(), Some("/models/rm"));
    assert_eq!(config.rewards.format.ngram_penalty, 0.5);
    assert_eq!(config.rewards.format.paragraph_penalty, 2.0);
    assert_eq!(
        config.metrics.prometheus_addr.as_deref(),
        Some("0.0.0.0:9090")
    );
    assert_eq!(
        config.metrics.member_prometheus_addr.as_deref(),
        Some("0.0.0.0:0")
    );
    assert_eq!(config.metrics.peak_tflops, Some(989.0));
}

#[test]
fn a_config_survives_a_round_trip_through_toml() {
    let mut config = JobConfig::from_toml_str(RECIPE, "longwriter-zero.toml").unwrap();
    config.grpo.tis_cap = Some(3.0);
    config.cluster.reward_addrs = vec!["10.0.0.2:50052".to_owned()];
    let text = toml::to_string(&config).unwrap();
    let back = JobConfig::from_toml_str(&text, "written.toml").unwrap();
    assert_eq!(back, config);
}

#[test]
fn a_syntax_error_reports_line_and_column() {
    let text = "[job]\nname = \"x\"\n[grpo\nsteps = 3\n";
    match JobConfig::from_toml_str(text, "job.toml") {
        Err(err @ JobConfigError::Parse { .. }) => {
            let message = err.to_string();
            assert!(
                message.starts_with("job.toml: TOML parse error at line 3, column 6"),
                "{message}"
            );
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
    let err =
        JobConfig::from_toml_str("[job]\nname = \"x\"\nname = \"y\"\n", "job.toml").unwrap_err();
    assert!(matches!(err, JobConfigError::Parse { .. }), "{err:?}");
    assert!(err.to_string().contains("line 3"), "{err}");
}

#[test]
fn a_template_file_replaces_the_section() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("card.toml"),
        "english = 'EN <|user|>: {question} <|assistant|>:'\nchinese = 'ZH <|用户|>: {question} <|助手|>:'\n",
    )
    .unwrap();
    let job_path = dir.path().join("job.toml");
    std::fs::write(&job_path, job("[template]\nfile = \"card.toml\"\n")).unwrap();
    let config = JobConfig::from_file(&job_path).unwrap();
    assert_eq!(config.template.render("写"), "ZH <|用户|>: 写 <|助手|>:");
    assert_eq!(config.template.file.as_deref(), Some("card.toml"));
    std::fs::write(
        dir.path().join("card.toml"),
        "english = 'no slot'\nchinese = '{question}'\n",
    )
    .unwrap();
    let err = JobConfig::from_file(&job_path).unwrap_err().to_string();
    assert!(
        err.contains("template.file: template file") && err.contains("`english` must contain"),
        "{err}"
    );
    std::fs::write(&job_path, job("[template]\nfile = \"gone.toml\"\n")).unwrap();
    let err = JobConfig::from_file(&job_path).unwrap_err().to_string();
    assert!(
        err.contains("template.file") && err.contains("gone.toml"),
        "{err}"
    );
}

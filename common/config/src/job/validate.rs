//! Validation of a parsed job file: every field's domain and the constraints between
//! fields, each failure naming the field's dotted path.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::Path;

use quill_reward::RewardError;

use super::{
    CheckpointSection, ClusterSection, DataSection, GrpoSection, JobConfig, JobConfigError,
    JobSection, JudgeMode, JudgeParse, JudgeSection, MetricsSection, ModelSection,
    OptimizerSection, ParallelSection, RewardsSection, SamplingSection, MAX_RELAY_FANOUT,
    MAX_WEIGHT_CHUNK_BYTES, MIN_WEIGHT_CHUNK_BYTES,
};
use crate::template::PromptTemplate;

/// The origin [`JobConfig::validate`] names in its errors.
const VALIDATE_ORIGIN: &str = "job config";

impl JobConfig {
    /// Checks every field's domain and the constraints between fields; errors name the
    /// field, with `job config` as their origin.
    pub fn validate(&self) -> Result<(), JobConfigError> {
        self.check().map_err(|problem| problem.at(VALIDATE_ORIGIN))
    }

    pub(super) fn check(&self) -> Check {
        self.job.check()?;
        self.model.check()?;
        self.data.check()?;
        check_template(&self.template)?;
        self.sampling.check()?;
        self.rewards.check()?;
        self.grpo.check()?;
        self.optimizer.check(&self.grpo)?;
        self.checkpoint.check()?;
        self.cluster.check()?;
        self.parallel.check()?;
        self.metrics.check()
    }
}

/// A field that fails validation.
pub(super) struct Problem {
    field: String,
    reason: String,
}

impl Problem {
    pub(super) fn at(self, origin: &str) -> JobConfigError {
        JobConfigError::Invalid {
            origin: origin.to_owned(),
            field: self.field,
            reason: self.reason,
        }
    }
}

/// The result of checking fields.
pub(super) type Check = Result<(), Problem>;

/// An error for `field` unless `ok`.
fn ensure(ok: bool, field: &str, reason: impl FnOnce() -> String) -> Check {
    if ok {
        Ok(())
    } else {
        Err(Problem {
            field: field.to_owned(),
            reason: reason(),
        })
    }
}

fn non_empty(field: &str, value: &str) -> Check {
    ensure(!value.trim().is_empty(), field, || {
        "must not be empty".to_owned()
    })
}

fn non_empty_path(field: &str, value: &Path) -> Check {
    ensure(!value.as_os_str().is_empty(), field, || {
        "must not be empty".to_owned()
    })
}

fn at_least<T: PartialOrd + Display>(field: &str, value: T, min: T) -> Check {
    ensure(value >= min, field, || {
        format!("must be at least {min}, got {value}")
    })
}

fn positive(field: &str, value: f64) -> Check {
    ensure(value.is_finite() && value > 0.0, field, || {
        format!("must be a finite number above 0, got {value}")
    })
}

fn non_negative(field: &str, value: f64) -> Check {
    ensure(value.is_finite() && value >= 0.0, field, || {
        format!("must be a finite number of at least 0, got {value}")
    })
}

/// An error unless `0 <= value < 1`.
fn unit_half_open(field: &str, value: f64) -> Check {
    ensure((0.0..1.0).contains(&value), field, || {
        format!("must be in [0, 1), got {value}")
    })
}

fn dtype(field: &str, value: &str) -> Check {
    ensure(matches!(value, "f32" | "bf16"), field, || {
        format!("must be \"f32\" or \"bf16\", got {value:?}")
    })
}

fn socket_addr(field: &str, value: &str) -> Check {
    ensure(value.parse::<SocketAddr>().is_ok(), field, || {
        format!("must be an address like \"127.0.0.1:50051\" (ip:port), got {value:?}")
    })
}

fn check_template(template: &PromptTemplate) -> Check {
    template.validate().map_err(|e| Problem {
        field: format!("template.{}", e.field),
        reason: e.reason,
    })
}

impl JobSection {
    fn check(&self) -> Check {
        let name_ok = !self.name.is_empty()
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        ensure(name_ok, "job.name", || {
            format!(
                "must be a non-empty name of letters, digits, '-', '_' and '.', got {:?}",
                self.name
            )
        })?;
        non_empty_path("job.output_dir", &self.output_dir)?;
        match &self.token_file {
            Some(path) => non_empty_path("job.token_file", path),
            None => Ok(()),
        }
    }
}

impl ModelSection {
    fn check(&self) -> Check {
        non_empty("model.path", &self.path)?;
        let device_ok = match self.device.as_str() {
            "cpu" | "cuda" => true,
            other => other
                .strip_prefix("cuda:")
                .is_some_and(|index| index.parse::<usize>().is_ok()),
        };
        ensure(device_ok, "model.device", || {
            format!(
                "must be \"cpu\", \"cuda\" or \"cuda:N\", got {:?}",
                self.device
            )
        })?;
        dtype("model.dtype", &self.dtype)?;
        match &self.reference_path {
            Some(path) => non_empty("model.reference_path", path),
            None => Ok(()),
        }
    }
}

impl DataSection {
    fn check(&self) -> Check {
        non_empty("data.path", &self.path)?;
        non_empty("data.question_field", &self.question_field)?;
        non_empty("data.prompt_field", &self.prompt_field)?;
        non_empty("data.length_field", &self.length_field)?;
        non_empty("data.range_field", &self.range_field)?;
        if let Some(p) = &self.range_predictor {
            ensure(
                p.url.starts_with("http://"),
                "data.range_predictor.url",
                || {
                    format!(
                        "must be an http:// URL such as \"http://127.0.0.1:8000\", got {:?}",
                        p.url
                    )
                },
            )?;
            non_empty("data.range_predictor.model", &p.model)?;
            positive("data.range_predictor.timeout_s", p.timeout_s)?;
        }
        Ok(())
    }
}

impl SamplingSection {
    fn check(&self) -> Check {
        at_least("sampling.group_size", self.group_size, 2)?;
        positive("sampling.temperature", self.temperature)?;
        ensure(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "sampling.top_p",
            || format!("must be in (0, 1], got {}", self.top_p),
        )?;
        at_least("sampling.max_new_tokens", self.max_new_tokens, 1)?;
        for (index, stop) in self.stop.iter().enumerate() {
            ensure(!stop.is_empty(), &format!("sampling.stop[{index}]"), || {
                "must not be empty".to_owned()
            })?;
        }
        Ok(())
    }
}

impl JudgeSection {
    fn check(&self) -> Check {
        let endpoint = self.endpoint.trim();
        ensure(
            endpoint.starts_with("http://"),
            "rewards.judge.endpoint",
            || {
                format!(
                    "must be a plain http:// URL such as http://127.0.0.1:8000/v1, got `{}`{}",
                    self.endpoint,
                    if endpoint.starts_with("https://") {
                        " (HTTPS is not supported: put a TLS-terminating proxy in front)"
                    } else {
                        ""
                    }
                )
            },
        )?;
        non_empty("rewards.judge.model", &self.model)?;
        if let Some(var) = &self.api_key_env {
            non_empty("rewards.judge.api_key_env", var)?;
        }
        non_empty_path("rewards.judge.prompt_file", &self.prompt_file)?;
        match self.mode {
            JudgeMode::Pairwise => {
                ensure(
                    self.references.is_some(),
                    "rewards.judge.references",
                    || {
                        "is required in pairwise mode (a JSONL file of question and reference)"
                            .to_owned()
                    },
                )?;
                ensure(
                    self.parse == JudgeParse::Text,
                    "rewards.judge.parse",
                    || {
                        "pairwise verdicts are read from the text: parse must be \"text\""
                            .to_owned()
                    },
                )?;
            }
            JudgeMode::Pointwise => ensure(
                self.min_score.is_finite()
                    && self.max_score.is_finite()
                    && self.min_score < self.max_score,
                "rewards.judge.max_score",
                || {
                    format!(
                        "must be above min_score ({} <= {})",
                        self.max_score, self.min_score
                    )
                },
            )?,
        }
        at_least("rewards.judge.concurrency", self.concurrency, 1)?;
        positive("rewards.judge.timeout_seconds", self.timeout_seconds)?;
        ensure(self.retries <= 10, "rewards.judge.retries", || {
            format!("must be at most 10, got {}", self.retries)
        })?;
        non_negative("rewards.judge.backoff_seconds", self.backoff_seconds)?;
        at_least("rewards.judge.max_tokens", self.max_tokens, 1)?;
        ensure(
            self.temperature.is_finite() && (0.0..=2.0).contains(&self.temperature),
            "rewards.judge.temperature",
            || format!("must be between 0 and 2, got {}", self.temperature),
        )
    }
}

impl RewardsSection {
    fn check(&self) -> Check {
        non_negative("rewards.length_weight", self.length_weight)?;
        non_negative("rewards.format_weight", self.format_weight)?;
        non_negative("rewards.quality_weight", self.quality_weight)?;
        let quality_on = self.has_quality();
        ensure(
            self.length_weight > 0.0
                || self.format_weight > 0.0
                || (quality_on && self.quality_weight > 0.0),
            "rewards",
            || {
                let quality = if quality_on {
                    format!("quality_weight = {}", self.quality_weight)
                } else {
                    "quality off (no quality_model or judge)".to_owned()
                };
                format!(
                    "no reward signal is on with a positive weight (length_weight = {}, \
                     format_weight = {}, {quality}); at least one must be",
                    self.length_weight, self.format_weight
                )
            },
        )?;
        at_least("rewards.l_max", self.l_max, 1)?;
        if let Some(path) = &self.quality_model {
            non_empty("rewards.quality_model", path)?;
        }
        at_least("rewards.quality_batch_size", self.quality_batch_size, 1)?;
        if let Some(judge) = &self.judge {
            ensure(self.quality_model.is_none(), "rewards.judge", || {
                "the quality reward comes from quality_model or a judge, not both".to_owned()
            })?;
            judge.check()?;
        }
        self.format.validate().map_err(|e| match e {
            RewardError::InvalidFormatConfig {
                field,
                value,
                problem,
            } => Problem {
                field: format!("rewards.format.{field}"),
                reason: format!("{problem}, got {value}"),
            },
            other => Problem {
                field: "rewards.format".to_owned(),
                reason: other.to_string(),
            },
        })
    }
}

impl GrpoSection {
    fn check(&self) -> Check {
        at_least("grpo.prompts_per_step", self.prompts_per_step, 1)?;
        unit_half_open("grpo.eps_low", self.eps_low)?;
        non_negative("grpo.eps_high", self.eps_high)?;
        non_negative("grpo.kl_coef", self.kl_coef)?;
        if let Some(cap) = self.tis_cap {
            ensure(cap.is_finite() && cap >= 1.0, "grpo.tis_cap", || {
                format!("must be a finite number of at least 1, got {cap}")
            })?;
        }
        at_least("grpo.steps", self.steps, 1)?;
        at_least("grpo.micro_batch_tokens", self.micro_batch_tokens, 1)?;
        at_least("grpo.logprob_chunk_tokens", self.logprob_chunk_tokens, 1)
    }
}

impl OptimizerSection {
    fn check(&self, grpo: &GrpoSection) -> Check {
        positive("optimizer.lr", self.lr)?;
        unit_half_open("optimizer.betas[0]", self.betas[0])?;
        unit_half_open("optimizer.betas[1]", self.betas[1])?;
        positive("optimizer.eps", self.eps)?;
        non_negative("optimizer.weight_decay", self.weight_decay)?;
        ensure(
            self.warmup_steps <= grpo.steps,
            "optimizer.warmup_steps",
            || {
                format!(
                    "must be at most grpo.steps ({}), got {}",
                    grpo.steps, self.warmup_steps
                )
            },
        )?;
        ensure(
            self.min_lr.is_finite() && (0.0..=self.lr).contains(&self.min_lr),
            "optimizer.min_lr",
            || format!("must be in [0, lr = {}], got {}", self.lr, self.min_lr),
        )?;
        non_negative("optimizer.max_grad_norm", self.max_grad_norm)
    }
}

impl CheckpointSection {
    fn check(&self) -> Check {
        at_least("checkpoint.keep", self.keep, 1)?;
        dtype("checkpoint.publish_dtype", &self.publish_dtype)
    }
}

impl ClusterSection {
    fn check(&self) -> Check {
        socket_addr("cluster.learner_addr", &self.learner_addr)?;
        for (index, addr) in self.reward_addrs.iter().enumerate() {
            socket_addr(&format!("cluster.reward_addrs[{index}]"), addr)?;
        }
        at_least("cluster.actors", self.actors, 1)?;
        at_least("cluster.reward_workers", self.reward_workers, 1)?;
        at_least("cluster.actor_batch", self.actor_batch, 1)?;
        at_least("cluster.leases_per_actor", self.leases_per_actor, 1)?;
        at_least("cluster.lease_seconds", self.lease_seconds, 1)?;
        ensure(
            self.max_lease_seconds >= self.lease_seconds,
            "cluster.max_lease_seconds",
            || {
                format!(
                    "must be at least cluster.lease_seconds ({}), got {}",
                    self.lease_seconds, self.max_lease_seconds
                )
            },
        )?;
        at_least("cluster.ingest_queue", self.ingest_queue, 1)?;
        ensure(
            (MIN_WEIGHT_CHUNK_BYTES..=MAX_WEIGHT_CHUNK_BYTES).contains(&self.weight_chunk_bytes),
            "cluster.weight_chunk_bytes",
            || {
                format!(
                    "must be in [{MIN_WEIGHT_CHUNK_BYTES}, {MAX_WEIGHT_CHUNK_BYTES}] \
                     (1 KiB to 64 MiB), got {}",
                    self.weight_chunk_bytes
                )
            },
        )?;
        ensure(
            self.relay_fanout <= MAX_RELAY_FANOUT,
            "cluster.relay_fanout",
            || {
                format!(
                    "must be at most {MAX_RELAY_FANOUT} (0 disables relaying), got {}",
                    self.relay_fanout
                )
            },
        )?;
        positive("cluster.heartbeat_seconds", self.heartbeat_seconds)?;
        positive("cluster.rpc_timeout_seconds", self.rpc_timeout_seconds)?;
        positive(
            "cluster.idle_connection_seconds",
            self.idle_connection_seconds,
        )?;
        self.check_transport()
    }

    /// TLS files are all named when `[cluster.tls]` is given; without it (and without
    /// `allow_plaintext`) every address must be loopback.
    fn check_transport(&self) -> Check {
        if let Some(tls) = &self.tls {
            for (field, path, what) in [
                (
                    "cluster.tls.ca_cert",
                    &tls.ca_cert,
                    "the job CA's certificate",
                ),
                ("cluster.tls.cert", &tls.cert, "this host's certificate"),
                ("cluster.tls.key", &tls.key, "this host's private key"),
            ] {
                ensure(!path.as_os_str().is_empty(), field, || {
                    format!("missing: the PEM file of {what} (`quill certs` makes one)")
                })?;
            }
            return Ok(());
        }
        if self.allow_plaintext {
            return Ok(());
        }
        let addresses = std::iter::once(("cluster.learner_addr".to_owned(), &self.learner_addr))
            .chain(
                self.reward_addrs
                    .iter()
                    .enumerate()
                    .map(|(i, addr)| (format!("cluster.reward_addrs[{i}]"), addr)),
            );
        for (field, addr) in addresses {
            let loopback = addr
                .parse::<SocketAddr>()
                .is_ok_and(|a| a.ip().is_loopback());
            ensure(loopback, &field, || {
                format!(
                    "{addr} is not a loopback address and TLS is off: set [cluster.tls] \
                     (see `quill certs`) or cluster.allow_plaintext = true"
                )
            })?;
        }
        Ok(())
    }
}

impl MetricsSection {
    fn check(&self) -> Check {
        non_empty_path("metrics.jsonl", &self.jsonl)?;
        positive("metrics.log_every_seconds", self.log_every_seconds)?;
        if let Some(addr) = &self.prometheus_addr {
            socket_addr("metrics.prometheus_addr", addr)?;
        }
        if let Some(addr) = &self.member_prometheus_addr {
            socket_addr("metrics.member_prometheus_addr", addr)?;
        }
        match self.peak_tflops {
            Some(peak) => ensure(
                peak.is_finite() && peak > 0.0,
                "metrics.peak_tflops",
                || format!("must be a finite number above 0, got {peak}"),
            ),
            None => Ok(()),
        }
    }
}

impl ParallelSection {
    fn check(&self) -> Check {
        positive("parallel.timeout_seconds", self.timeout_seconds)?;
        positive("parallel.bucket_mb", self.bucket_mb)
    }
}

#[cfg(test)]
mod tests {
    use crate::job::tests::{invalid, job};
    use crate::job::JobConfig;
    use crate::job::{JudgeMode, JudgeParse};

    #[test]
    fn out_of_domain_values_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[grpo]\neps_low = 1.5",
                "grpo.eps_low",
                "must be in [0, 1), got 1.5",
            ),
            (
                "[sampling]\ngroup_size = 1",
                "sampling.group_size",
                "must be at least 2, got 1",
            ),
            (
                "[sampling]\ntop_p = 0.0",
                "sampling.top_p",
                "must be in (0, 1], got 0",
            ),
            (
                "[sampling]\ntemperature = nan",
                "sampling.temperature",
                "must be a finite number above 0, got NaN",
            ),
            (
                "[cluster]\nlease_seconds = 60\nmax_lease_seconds = 30",
                "cluster.max_lease_seconds",
                "must be at least cluster.lease_seconds (60), got 30",
            ),
            (
                "[cluster]\nlearner_addr = \"localhost\"",
                "cluster.learner_addr",
                "must be an address like \"127.0.0.1:50051\" (ip:port), got \"localhost\"",
            ),
            (
                "[cluster]\nreward_addrs = [\"127.0.0.1:1\", \"nowhere:x\"]",
                "cluster.reward_addrs[1]",
                "must be an address like \"127.0.0.1:50051\" (ip:port), got \"nowhere:x\"",
            ),
            (
                "[metrics]\nprometheus_addr = \"localhost:9090\"",
                "metrics.prometheus_addr",
                "must be an address like \"127.0.0.1:50051\" (ip:port), got \"localhost:9090\"",
            ),
            (
                "[metrics]\nmember_prometheus_addr = \"0.0.0.0\"",
                "metrics.member_prometheus_addr",
                "must be an address like \"127.0.0.1:50051\" (ip:port), got \"0.0.0.0\"",
            ),
            (
                "[metrics]\npeak_tflops = 0.0",
                "metrics.peak_tflops",
                "must be a finite number above 0, got 0",
            ),
            (
                "[cluster]\nweight_chunk_bytes = 0",
                "cluster.weight_chunk_bytes",
                "must be in [1024, 67108864] (1 KiB to 64 MiB), got 0",
            ),
            (
                "[cluster]\nlearner_addr = \"10.0.0.1:50051\"",
                "cluster.learner_addr",
                "10.0.0.1:50051 is not a loopback address and TLS is off: set [cluster.tls] \
                 (see `quill certs`) or cluster.allow_plaintext = true",
            ),
            (
                "[cluster]\nreward_addrs = [\"127.0.0.1:7\", \"0.0.0.0:7\"]",
                "cluster.reward_addrs[1]",
                "0.0.0.0:7 is not a loopback address and TLS is off: set [cluster.tls] \
                 (see `quill certs`) or cluster.allow_plaintext = true",
            ),
            (
                "[cluster.tls]\nca_cert = \"ca.pem\"\ncert = \"host.pem\"",
                "cluster.tls.key",
                "missing: the PEM file of this host's private key (`quill certs` makes one)",
            ),
            (
                "[cluster.tls]\ncert = \"host.pem\"\nkey = \"host.key\"",
                "cluster.tls.ca_cert",
                "missing: the PEM file of the job CA's certificate (`quill certs` makes one)",
            ),
            (
                "[cluster]\nrelay_fanout = 65",
                "cluster.relay_fanout",
                "must be at most 64 (0 disables relaying), got 65",
            ),
            (
                "[model]\ndtype = \"f8\"",
                "model.dtype",
                "must be \"f32\" or \"bf16\", got \"f8\"",
            ),
            (
                "[model]\ndevice = \"cuda:x\"",
                "model.device",
                "must be \"cpu\", \"cuda\" or \"cuda:N\", got \"cuda:x\"",
            ),
            (
                "[checkpoint]\npublish_dtype = \"fp16\"",
                "checkpoint.publish_dtype",
                "must be \"f32\" or \"bf16\", got \"fp16\"",
            ),
            (
                "[grpo]\nlogprob_chunk_tokens = 0",
                "grpo.logprob_chunk_tokens",
                "must be at least 1, got 0",
            ),
            (
                "[grpo]\ntis_cap = 0.5",
                "grpo.tis_cap",
                "must be a finite number of at least 1, got 0.5",
            ),
            (
                "[grpo]\nsteps = 10\n[optimizer]\nwarmup_steps = 11",
                "optimizer.warmup_steps",
                "must be at most grpo.steps (10), got 11",
            ),
            (
                "[optimizer]\nbetas = [0.9, 1.0]",
                "optimizer.betas[1]",
                "must be in [0, 1), got 1",
            ),
            (
                "[rewards.format]\nmax_ngram_share = 1.5",
                "rewards.format.max_ngram_share",
                "it must be a share between 0 and 1, got 1.5",
            ),
            (
                "[rewards]\nlength_weight = -1.0",
                "rewards.length_weight",
                "must be a finite number of at least 0, got -1",
            ),
            (
                "[template]\nenglish = \"no slot\"\nchinese = \"{question}\"",
                "template.english",
                "must contain {question} exactly once (found 0)",
            ),
            (
                "[data.range_predictor]\nurl = \"ftp://x\"",
                "data.range_predictor.url",
                "must be an http:// URL such as \"http://127.0.0.1:8000\", got \"ftp://x\"",
            ),
            (
                "[template]\nchinese_share = 2.0",
                "template.chinese_share",
                "must be in (0, 1], got 2",
            ),
        ];
        for (extra, want_field, want_reason) in cases {
            let (field, reason) = invalid(&job(extra));
            assert_eq!(
                (field.as_str(), reason.as_str()),
                (*want_field, *want_reason)
            );
        }
    }

    #[test]
    fn judge_fields_are_checked_and_named() {
        let ok = "[rewards.judge]\nendpoint = \"http://127.0.0.1:8000/v1\"\nmodel = \"m\"\n\
                  prompt_file = \"rubric.txt\"\n";
        let config = JobConfig::from_toml_str(&job(ok), "t").unwrap();
        let judge = config.rewards.judge.as_ref().unwrap();
        assert_eq!(
            (judge.mode, judge.parse),
            (JudgeMode::Pointwise, JudgeParse::Text)
        );
        assert!(config.rewards.has_quality());
        let cases: &[(&str, &str, &str)] = &[
            (
                "endpoint = \"https://api.example.com/v1\"",
                "rewards.judge.endpoint",
                "HTTPS is not supported",
            ),
            (
                "endpoint = \"localhost:8000\"",
                "rewards.judge.endpoint",
                "must be a plain http:// URL",
            ),
            ("model = \"\"", "rewards.judge.model", "must not be empty"),
            (
                "mode = \"pairwise\"",
                "rewards.judge.references",
                "is required in pairwise mode",
            ),
            (
                "mode = \"pairwise\"\nreferences = \"r.jsonl\"\nparse = \"logprobs\"",
                "rewards.judge.parse",
                "must be \"text\"",
            ),
            (
                "min_score = 5.0\nmax_score = 5.0",
                "rewards.judge.max_score",
                "must be above min_score",
            ),
            (
                "concurrency = 0",
                "rewards.judge.concurrency",
                "must be at least 1",
            ),
            (
                "timeout_seconds = 0.0",
                "rewards.judge.timeout_seconds",
                "above 0",
            ),
            ("retries = 11", "rewards.judge.retries", "at most 10"),
            (
                "temperature = 3.0",
                "rewards.judge.temperature",
                "between 0 and 2",
            ),
        ];
        for (line, want_field, want_reason) in cases {
            let mut text = "[rewards.judge]\n".to_owned();
            for base in ok.lines().skip(1) {
                let key = base.split(" =").next().unwrap();
                if !line.contains(&format!("{key} =")) {
                    text.push_str(base);
                    text.push('\n');
                }
            }
            text.push_str(line);
            text.push('\n');
            let (field, reason) = invalid(&job(&text));
            assert_eq!(field, *want_field, "{line}: {reason}");
            assert!(reason.contains(want_reason), "{line}: {reason}");
        }
        let both = format!("[rewards]\nquality_model = \"rm\"\n{ok}");
        let (field, reason) = invalid(&job(&both));
        assert_eq!(field, "rewards.judge", "{reason}");
        let (field, _) = invalid(&job("[rewards.judge]\nendpoint = \"http://h/v1\"\nmodel = \"m\"\nprompt_file = \"p\"\nrubric = 1\n"));
        assert!(field.contains("rubric"), "{field}");
    }

    #[test]
    fn the_display_names_origin_and_field() {
        let err =
            JobConfig::from_toml_str(&job("[grpo]\neps_low = 1.5\n"), "job.toml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "job.toml: grpo.eps_low: must be in [0, 1), got 1.5"
        );
        let mut config = JobConfig::default();
        config.job.name = "x".to_owned();
        config.validate().unwrap();
        config.cluster.actors = 0;
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "job config: cluster.actors: must be at least 1, got 0"
        );
    }

    #[test]
    fn addresses_off_loopback_need_tls_or_leave_for_plaintext() {
        let remote = "[cluster]\nlearner_addr = \"10.0.0.1:50051\"\n";
        let allowed = format!("{remote}allow_plaintext = true\n");
        let parsed = JobConfig::from_toml_str(&job(&allowed), "job.toml").unwrap();
        assert!(parsed.cluster.allow_plaintext && parsed.cluster.tls.is_none());
        let with_tls = format!(
            "{remote}[cluster.tls]\nca_cert = \"c/ca.pem\"\ncert = \"c/h.pem\"\nkey = \"c/h.key\"\n"
        );
        let parsed = JobConfig::from_toml_str(&job(&with_tls), "job.toml").unwrap();
        let tls = parsed.cluster.tls.unwrap();
        assert_eq!(tls.key, std::path::Path::new("c/h.key"));
        let (field, _) = invalid(&job("[cluster.tls]\nca = \"x\"\n"));
        assert_eq!(field, "cluster.tls.ca");
    }

    #[test]
    fn a_job_needs_a_name() {
        let (field, reason) = invalid("[grpo]\nsteps = 3\n");
        assert_eq!(field, "job.name");
        assert_eq!(
            reason,
            "must be a non-empty name of letters, digits, '-', '_' and '.', got \"\""
        );
        let (field, _) = invalid("[job]\nname = \"a b\"\n");
        assert_eq!(field, "job.name");
    }

    #[test]
    fn at_least_one_weighted_reward_must_be_on() {
        let (field, reason) = invalid(&job(
            "[rewards]\nlength_weight = 0.0\nformat_weight = 0.0\nquality_weight = 0.0\n\
             quality_model = \"/models/rm\"\n",
        ));
        assert_eq!(field, "rewards");
        assert_eq!(
            reason,
            "no reward signal is on with a positive weight (length_weight = 0, \
             format_weight = 0, quality_weight = 0); at least one must be"
        );
        // Without a quality model, a quality weight does not count.
        let (field, reason) = invalid(&job(
            "[rewards]\nlength_weight = 0.0\nformat_weight = 0.0\nquality_weight = 5.0\n",
        ));
        assert_eq!(field, "rewards");
        assert!(
            reason.contains("quality off (no quality_model or judge)"),
            "{reason}"
        );
        let config = JobConfig::from_toml_str(
            &job("[rewards]\nlength_weight = 0.0\nformat_weight = 0.0\nquality_model = \"rm\"\n"),
            "job.toml",
        )
        .unwrap();
        assert_eq!(config.rewards.quality_weight, 1.0);
    }
}

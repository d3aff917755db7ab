//! `quill eval`: generate answers to a prompt file (Arena-Write's records or any JSONL)
//! with a local model or an OpenAI-compatible endpoint, and score them: LongBench-Write's
//! length score, a judge's 1–10 critic score, and pairwise verdicts in both orders against
//! the baseline's (and other models') answers, rated Bradley–Terry/Elo with bootstrap
//! intervals. Per-sample results are appended to `OUT/samples.jsonl` as they finish, so a
//! second run skips them; the summary goes to `OUT/results.json` and PNG charts.

mod args;
mod critic;
mod endpoint;
mod generation;
mod judge;
mod length_score;
mod models;
mod pairwise;
mod plot;
mod prompts;
mod rating;
mod report;
mod rubric;
mod samples;
mod settings;

pub use args::Args;

use crate::cli::model_args::ModelArgs;
use anyhow::{bail, Context};
use endpoint::{Endpoint, Retry};
use generation::{answer_of, Generator, Sampling};
use indicatif::{ProgressBar, ProgressStyle};
use prompts::{Fields, Prompt};
use quill_config::template::PromptTemplate;
use report::ModelInfo;
use rubric::Rubric;
use samples::{SampleRecord, SampleStore};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// The opponent name of the prompt file's baseline answers.
const BASELINE: &str = "baseline";

/// What every sample's task reads.
struct Shared {
    judging: Option<judge::Judging>,
    compare: Vec<(String, HashMap<String, String>)>,
}

/// Runs `quill eval`.
pub fn run(args: Args) -> anyhow::Result<()> {
    check_flags(&args)?;
    let fields = Fields {
        question: &args.question_field,
        id: &args.id_field,
        length: &args.length_field,
        kind: &args.type_field,
        baseline: &args.baseline_field,
    };
    let prompts = prompts::read_prompts(&args.prompts, &fields, args.limit)?;
    let models = models::model_specs(&args)?;
    let retry = Retry {
        timeout: Duration::from_secs_f64(args.timeout_s),
        retries: args.retries,
        backoff: Duration::from_secs_f64(args.backoff_s),
    };
    let shared = Arc::new(Shared {
        judging: judge::from_args(&args, retry)?,
        compare: compare_files(&args)?,
    });
    let mut opponents = Vec::new();
    if prompts.iter().any(|p| p.baseline.is_some()) {
        opponents.push(BASELINE.to_owned());
    }
    opponents.extend(shared.compare.iter().map(|(name, _)| name.clone()));
    let template = match &args.job {
        Some(path) => {
            quill_config::JobConfig::from_file(path)
                .with_context(|| format!("--job {}", path.display()))?
                .template
        }
        None => PromptTemplate::default(),
    };
    let sampling = Sampling {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("--out {}: creating the folder", args.out.display()))?;
    settings::check_or_write(
        &args.out.join("run.json"),
        &run_settings(&args, &template, shared.judging.as_ref())?,
    )?;
    let samples_path = args.out.join("samples.jsonl");
    let mut store = SampleStore::open(&samples_path)?;
    let todo: Vec<Vec<Prompt>> = models
        .iter()
        .map(|m| {
            prompts
                .iter()
                .filter(|p| !store.has(&m.info.name, &p.id))
                .cloned()
                .collect()
        })
        .collect();
    let total: usize = todo.iter().map(Vec::len).sum();
    let already = prompts.len() * models.len() - total;
    if already > 0 {
        eprintln!(
            "{already} samples already done in {}; {total} to go",
            samples_path.display()
        );
    }
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}<{eta_precise}] {bar:30} {pos}/{len} samples  {msg}",
        )
        .expect("valid template"),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let evaluated = (|| {
        for (model, todo) in models.iter().zip(todo) {
            if todo.is_empty() {
                continue;
            }
            bar.set_message(format!("model {}", model.info.name));
            let generator = Arc::new(match &model.source {
                models::Source::Local(path) => Generator::local(
                    ModelArgs {
                        model: path.clone(),
                        device: args.device.clone(),
                        dtype: args.dtype.clone(),
                        threads: args.threads,
                    },
                    template.clone(),
                    sampling,
                    args.batch_size,
                    args.concurrency,
                )?,
                models::Source::Remote => Generator::Remote {
                    endpoint: Box::new(Endpoint::new(
                        "--endpoint",
                        args.endpoint
                            .as_deref()
                            .expect("a remote model has --endpoint"),
                        &model.info.name,
                        args.endpoint_api_key_env.as_deref(),
                        retry,
                    )?),
                    sampling,
                },
            });
            runtime.block_on(evaluate_model(
                &model.info.name,
                todo,
                generator,
                Arc::clone(&shared),
                &mut store,
                &bar,
                args.concurrency,
            ))?;
        }
        anyhow::Ok(())
    })();
    bar.finish_and_clear();
    runtime.shutdown_background();
    evaluated.with_context(|| {
        format!(
            "finished samples are kept in {}: run the same command again to continue",
            samples_path.display()
        )
    })?;
    let infos: Vec<ModelInfo> = models.iter().map(|m| m.info.clone()).collect();
    let per_model: Vec<Vec<&SampleRecord>> = infos
        .iter()
        .map(|m| {
            prompts
                .iter()
                .filter_map(|p| store.get(&m.name, &p.id))
                .collect()
        })
        .collect();
    let summary = report::summarise(
        &infos,
        &per_model,
        &opponents,
        args.bootstrap,
        args.bootstrap_seed,
    );
    report::write(&args.out, &summary, &per_model)?;
    report::print(&summary);
    crate::plot::register_embedded_font()?;
    for (m, records) in summary.models.iter().zip(&per_model) {
        let file = if infos.len() == 1 {
            "summary.png".to_owned()
        } else {
            format!("summary-{}.png", file_safe(&m.model))
        };
        let path = args.out.join(file);
        plot::draw_summary(&path, m, records)?;
        println!("wrote {}", path.display());
    }
    if infos.len() > 1 {
        let path = args.out.join("series.png");
        plot::draw_series(&path, &summary.models, summary.anchor.as_deref())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The settings the per-sample results depend on (see [`settings`]).
fn run_settings(
    args: &Args,
    template: &PromptTemplate,
    judging: Option<&judge::Judging>,
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let prompts = std::fs::canonicalize(&args.prompts)
        .with_context(|| format!("--prompts {}", args.prompts.display()))?;
    let rubric = |r: Option<&Rubric>| r.map(|r| r.text().to_owned());
    let settings = json!({
        "prompts": prompts,
        "fields": [&args.question_field, &args.id_field, &args.length_field,
                   &args.type_field, &args.baseline_field],
        "endpoint": args.endpoint,
        "template": [template.render("Q"), template.render("问")],
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "judge_endpoint": args.judge_endpoint,
        "judge_model": args.judge_model,
        "critic_template": rubric(judging.and_then(|j| j.critic.as_ref())),
        "pairwise_template": rubric(judging.and_then(|j| j.pairwise.as_ref())),
        "judge_max_tokens": args.judge_max_tokens,
        "judge_temperature": args.judge_temperature,
        "compare": args.compare,
    });
    Ok(settings.as_object().expect("an object").clone())
}

/// Checks the numeric flags.
fn check_flags(args: &Args) -> anyhow::Result<()> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        bail!("--temperature must be 0 or more, got {}", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    if !(args.timeout_s.is_finite() && args.timeout_s > 0.0) {
        bail!("--timeout-s must be above 0, got {}", args.timeout_s);
    }
    if !(args.backoff_s.is_finite() && args.backoff_s >= 0.0) {
        bail!("--backoff-s must be 0 or more, got {}", args.backoff_s);
    }
    if args.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if args.judge_endpoint.is_none() {
        for (given, flag) in [
            (args.pairwise_template.is_some(), "--pairwise-template"),
            (args.critic_template.is_some(), "--critic-template"),
            (!args.compare.is_empty(), "--compare"),
        ] {
            if given {
                bail!("{flag} needs --judge-endpoint");
            }
        }
    }
    Ok(())
}

/// A model name as a file name.
fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The --compare files, by name.
fn compare_files(args: &Args) -> anyhow::Result<Vec<(String, HashMap<String, String>)>> {
    let mut files: Vec<(String, HashMap<String, String>)> = Vec::new();
    for spec in &args.compare {
        let Some((name, file)) = spec.split_once('=') else {
            bail!("--compare {spec}: expected NAME=FILE");
        };
        let name = name.trim();
        if name.is_empty() || name == BASELINE || files.iter().any(|(n, _)| n == name) {
            bail!("--compare {spec}: the name must be new, not empty and not `{BASELINE}`");
        }
        let answers = prompts::read_answers(
            Path::new(file),
            &args.id_field,
            &format!("--compare {spec}"),
        )?;
        files.push((name.to_owned(), answers));
    }
    Ok(files)
}

/// Evaluates `todo` with one model, starting the prompts in file order with at most
/// `concurrency` at a time and appending each record as it finishes. The first failure
/// starts nothing more; the samples already running finish and are kept, and then that
/// failure is returned.
async fn evaluate_model(
    model: &str,
    todo: Vec<Prompt>,
    generator: Arc<Generator>,
    shared: Arc<Shared>,
    store: &mut SampleStore,
    bar: &ProgressBar,
    concurrency: usize,
) -> anyhow::Result<()> {
    let mut tasks = JoinSet::new();
    let mut unreadable = Unreadable::default();
    let mut failure = None;
    let mut todo = todo.into_iter();
    loop {
        if failure.is_none() && tasks.len() < concurrency {
            if let Some(prompt) = todo.next() {
                let (generator, shared) = (Arc::clone(&generator), Arc::clone(&shared));
                let model = model.to_owned();
                tasks
                    .spawn(async move { evaluate_one(&model, &prompt, &generator, &shared).await });
                continue;
            }
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        match joined.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(record) => {
                unreadable.count(&record);
                store.append(record)?;
                bar.inc(1);
                if let Some(message) = unreadable.message(model) {
                    bar.set_message(message);
                }
            }
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    failure.map_or(Ok(()), Err)
}

/// Judge answers that could not be read, counted for the progress line.
#[derive(Default)]
struct Unreadable {
    verdicts: usize,
    scores: usize,
}

impl Unreadable {
    fn count(&mut self, record: &SampleRecord) {
        self.verdicts += record.pairwise.iter().map(|c| c.unparsable).sum::<usize>();
        self.scores += usize::from(record.critic.as_ref().is_some_and(|c| c.score.is_none()));
    }

    /// The progress message, once anything was unreadable.
    fn message(&self, model: &str) -> Option<String> {
        (self.verdicts + self.scores > 0).then(|| {
            format!(
                "model {model}: {} unreadable verdicts, {} unreadable scores",
                self.verdicts, self.scores
            )
        })
    }
}

/// Generates and scores one answer.
async fn evaluate_one(
    model: &str,
    prompt: &Prompt,
    generator: &Generator,
    shared: &Shared,
) -> anyhow::Result<SampleRecord> {
    let generated = generator.generate(prompt).await?;
    let answer = answer_of(&generated.response);
    let output_length = quill_reward::count_words(&answer);
    let length_score = prompt
        .length
        .map(|required| length_score::length_score(required, output_length as f64));
    let (mut critic, mut pairwise) = (None, Vec::new());
    if let Some(judging) = &shared.judging {
        if let Some(rubric) = &judging.critic {
            critic = Some(judging.critic(rubric, &prompt.question, &answer).await?);
        }
        if let Some(rubric) = &judging.pairwise {
            let opponents = prompt
                .baseline
                .as_deref()
                .map(|b| (BASELINE, b))
                .into_iter()
                .chain(shared.compare.iter().filter_map(|(name, answers)| {
                    Some((name.as_str(), answers.get(&prompt.id)?.as_str()))
                }));
            for (opponent, other) in opponents {
                pairwise.push(
                    judging
                        .compare(rubric, &prompt.question, &answer, other, opponent)
                        .await?,
                );
            }
        }
    }
    Ok(SampleRecord {
        model: model.to_owned(),
        id: prompt.id.clone(),
        idx: prompt.id_value.clone(),
        kind: prompt.kind.clone(),
        question: prompt.question.clone(),
        required_length: prompt.length,
        output_length,
        length_score,
        response: generated.response,
        answer,
        finish_reason: generated.finish_reason,
        critic,
        pairwise,
    })
}

//! `quill bench rl`: quill's asynchronous pipeline, quill's synchronous mode and TRL's
//! `GRPOTrainer` on one task, in one run: the same randomly initialised tiny Qwen2 (built
//! by `transformers` from a seed), the same prompts, the same length reward (TRL gets
//! the Python port that `tests/reward_port.rs` checks against the Rust one), the same
//! group size, prompts per step, new-token limit, temperature, learning rate and CPU
//! thread budget. One evaluator (the same Python code) scores every final checkpoint.

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use quill_config::job::JobConfig;
use quill_learner::train::checkpoint::latest_checkpoint;
use quill_model::default_model;
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The Python side: model set-up, the TRL run and the evaluator.
const RL_BENCH_PY: &str = include_str!("../../../tests/reference/rl_bench.py");
/// The Python port of quill's length reward, imported by [`RL_BENCH_PY`].
const LENGTH_REWARD_PY: &str = include_str!("../../../tests/reference/length_reward.py");
/// The project's virtual environment, made by `scripts/setup.sh`.
const VENV_PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
/// What opens every response: the default job's prefix, so that the random model only has
/// to learn to write the answer and close it.
const RESPONSE_PREFIX: &str = " <think> </think><answer>";
/// The length reward's `l_max` for both systems (words; small for short answers).
const L_MAX: u32 = 400;

/// Flags of `quill bench rl`.
#[derive(clap::Args, Debug)]
pub struct RlArgs {
    /// Directory for the models, the runs' logs and metrics and `results.json` (created;
    /// must not hold an earlier run).
    #[arg(long, default_value = "runs/bench-rl")]
    pub out: PathBuf,
    /// Optimiser steps of every run (TRL's; quill's too unless `--quill-steps`).
    #[arg(long, default_value_t = 150)]
    pub steps: u64,
    /// Optimiser steps of quill's runs (default: `--steps`). The time to TRL's final
    /// reward is a wall-clock race: a quill run that has not reached it by TRL's step
    /// count may go on learning, at the same learning rate, if it has the time. Its
    /// final reward and evaluation are then those after these steps.
    #[arg(long)]
    pub quill_steps: Option<u64>,
    /// Samples per prompt (GRPO's G).
    #[arg(long, default_value_t = 8)]
    pub group_size: usize,
    /// Prompts per optimiser step.
    #[arg(long, default_value_t = 2)]
    pub prompts_per_step: usize,
    /// Most new tokens per sample.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Learning rate (constant, no warm-up).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// CPU threads of each system: TRL's torch threads; quill's learner gets half (at
    /// least 1) and its actor the rest.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Seed of the model, the prompts' order and sampling (see `--repeats`).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of "write N words" prompts.
    #[arg(long, default_value_t = 32)]
    pub prompts: usize,
    /// Long-tailed lengths: every fourth prompt asks for eight times as many words.
    #[arg(long)]
    pub long_tail: bool,
    /// Samples per prompt of the final evaluation.
    #[arg(long, default_value_t = 4)]
    pub eval_samples: usize,
    /// Length-reward levels whose time to reach is reported (moving average over
    /// `--window` steps).
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.6,0.7")]
    pub levels: Vec<f64>,
    /// Steps in the moving average of the reward curves.
    #[arg(long, default_value_t = 10)]
    pub window: usize,
    /// Runs of each system, all from the same model: run r samples (and quill orders
    /// its prompts) with seed `--seed + r − 1`. One run says little on this small task:
    /// TRL's seeded run repeats exactly, but its final reward is one draw, and quill's
    /// asynchronous pipeline differs run to run (groups arrive in timing order). The
    /// report shows every run, TRL's median final reward and training time, and how
    /// many quill runs reached that reward and when.
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Which systems to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "async,sync,trl"
    )]
    pub systems: Vec<System>,
    /// Python interpreter with torch, transformers and trl (default: the project's venv).
    #[arg(long)]
    pub python: Option<PathBuf>,
}

/// The systems a run compares.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum System {
    /// quill's asynchronous pipeline (`max_staleness = 1`).
    Async,
    /// quill's synchronous mode (`max_staleness = 0`: generate a step's groups, train, repeat).
    Sync,
    /// TRL's `GRPOTrainer`.
    Trl,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Async => "quill async",
            System::Sync => "quill sync",
            System::Trl => "TRL 1.16",
        }
    }
}

/// One step of a run's reward curve.
#[derive(Debug, Clone, Copy, Serialize)]
struct Point {
    elapsed_s: f64,
    reward: f64,
    tokens: u64,
}

/// What one system did.
#[derive(Debug, Serialize)]
struct Outcome {
    system: System,
    /// Which run of the system (1-based).
    run: usize,
    wall_s: f64,
    train_s: f64,
    steps: usize,
    tokens: u64,
    final_reward: f64,
    eval: Value,
    curve: Vec<Point>,
}

/// One prompt of the task.
struct Task {
    question: String,
    lo: u32,
    hi: u32,
}

/// Runs the benchmark.
pub fn run(args: RlArgs) -> anyhow::Result<()> {
    check_args(&args)?;
    if args.out.exists() && std::fs::read_dir(&args.out)?.next().is_some() {
        bail!(
            "--out {} already holds files; give a new directory",
            args.out.display()
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let out = args.out.canonicalize()?;
    let python = args
        .python
        .clone()
        .unwrap_or_else(|| PathBuf::from(VENV_PYTHON));
    let script = out.join("rl_bench.py");
    std::fs::write(&script, RL_BENCH_PY)?;
    std::fs::write(out.join("length_reward.py"), LENGTH_REWARD_PY)?;
    let py = Python {
        python,
        script,
        threads: args.threads,
    };

    let tokenizer_dir = out.join("tokenizer");
    default_model::write_to(&tokenizer_dir, tch::Kind::Float)?;
    let model = out.join("model");
    stage("building the random model (transformers)", || {
        py.call(
            "make-model",
            &[
                ("--seed", args.seed.to_string()),
                ("--tokenizer-dir", path(&tokenizer_dir)),
                ("--out", path(&model)),
            ],
            &out.join("make-model.log"),
        )
    })?;
    let tasks = tasks(args.prompts, args.long_tail);
    let job_for = |system: System, run: usize| {
        job_toml(&args, system, run, &model, &out.join("prompts.jsonl"))
    };
    let template = JobConfig::from_toml_str(&job_for(System::Async, 1), "bench job")?.template;
    write_prompts(&out, &tasks, |q| template.render(q))?;

    let mut outcomes = Vec::new();
    for &system in &args.systems {
        for run in 1..=args.repeats {
            outcomes.push(match system {
                System::Async | System::Sync => {
                    run_quill(&args, &py, &out, system, run, &job_for(system, run))?
                }
                System::Trl => run_trl(&args, &py, &out, &model, run)?,
            });
        }
    }
    report(&args, &outcomes);
    let results = serde_json::json!({ "args": format!("{args:?}"), "outcomes": outcomes });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    println!("results: {}", out.join("results.json").display());
    Ok(())
}

fn check_args(args: &RlArgs) -> anyhow::Result<()> {
    if args.steps == 0
        || args.quill_steps == Some(0)
        || args.prompts == 0
        || args.eval_samples == 0
        || args.window == 0
        || args.repeats == 0
    {
        bail!(
            "--steps, --quill-steps, --prompts, --eval-samples, --window and --repeats must be positive"
        );
    }
    if args.group_size < 2 {
        bail!("--group-size must be at least 2, got {}", args.group_size);
    }
    if args.prompts_per_step == 0 || args.threads == 0 || args.max_new_tokens < 8 {
        bail!("--prompts-per-step and --threads must be positive and --max-new-tokens at least 8");
    }
    if !(args.temperature > 0.0 && args.lr > 0.0) {
        bail!("--temperature and --lr must be above 0");
    }
    if args.systems.is_empty() {
        bail!("--systems names none of async, sync, trl");
    }
    Ok(())
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Runs `work` under a spinner that names the stage and shows the time spent.
fn stage<T>(what: &str, work: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let bar = ProgressBar::new_spinner().with_message(what.to_owned());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let started = Instant::now();
    let result = work();
    bar.finish_and_clear();
    match &result {
        Ok(_) => println!("{what}: {:.0} s", started.elapsed().as_secs_f64()),
        Err(_) => println!("{what}: failed"),
    }
    result
}

/// The task: "write N words" prompts over a few kinds and topics.
fn tasks(n: usize, long_tail: bool) -> Vec<Task> {
    const KINDS: [&str; 4] = ["story", "poem", "letter", "essay"];
    const TOPICS: [&str; 8] = [
        "the sea",
        "a city at night",
        "an old tree",
        "a long journey",
        "the first snow",
        "a quiet library",
        "a lost key",
        "the harvest",
    ];
    const RANGES: [(u32, u32); 4] = [(10, 30), (30, 50), (50, 70), (20, 40)];
    (0..n)
        .map(|i| {
            let (mut lo, mut hi) = RANGES[i % RANGES.len()];
            if long_tail && i % 4 == 3 {
                (lo, hi) = (lo * 8, hi * 8);
            }
            let kind = KINDS[i % KINDS.len()];
            let topic = TOPICS[(i / KINDS.len()) % TOPICS.len()];
            Task {
                question: format!("Write a {kind} about {topic} in {lo} to {hi} words."),
                lo,
                hi,
            }
        })
        .collect()
}

/// Writes `prompts.jsonl` (quill's data file: question and range) and
/// `prompts-rendered.jsonl` (TRL's and the evaluator's: the prompt as quill renders it).
fn write_prompts(
    out: &Path,
    tasks: &[Task],
    render: impl Fn(&str) -> String,
) -> anyhow::Result<()> {
    let mut quill = String::new();
    let mut rendered = String::new();
    for t in tasks {
        let q = serde_json::json!({"question": t.question, "length_range": [t.lo, t.hi]});
        quill.push_str(&format!("{q}\n"));
        let r = serde_json::json!({"prompt": render(&t.question), "lo": t.lo, "hi": t.hi});
        rendered.push_str(&format!("{r}\n"));
    }
    std::fs::write(out.join("prompts.jsonl"), quill)?;
    std::fs::write(out.join("prompts-rendered.jsonl"), rendered)?;
    Ok(())
}

/// The quill job of `system`: only the length reward, and the TRL run's optimiser
/// settings (AdamW, weight decay 0.01, constant learning rate, gradient norm clipped at 1).
fn job_toml(args: &RlArgs, system: System, run: usize, model: &Path, prompts: &Path) -> String {
    let name = if system == System::Sync {
        "sync"
    } else {
        "async"
    };
    let max_staleness = u8::from(system != System::Sync);
    // The one actor may hold every group admission lets into the pipeline, and decodes
    // all of their samples at once.
    let leases = (usize::from(max_staleness) + 1) * args.prompts_per_step;
    let actor_batch = args.group_size * leases;
    format!(
        r#"[job]
name = "bench-rl-{name}"
seed = {seed}
[model]
path = "{model}"
[data]
path = "{prompts}"
[template]
response_prefix = "{RESPONSE_PREFIX}"
[sampling]
group_size = {g}
temperature = {t}
max_new_tokens = {n}
[rewards]
length_weight = 1.0
format_weight = 0.0
l_max = {L_MAX}
[grpo]
prompts_per_step = {p}
steps = {steps}
max_staleness = {max_staleness}
drop_zero_advantage_groups = true
[optimizer]
lr = {lr:e}
weight_decay = 0.01
warmup_steps = 0
schedule = "constant"
max_grad_norm = 1.0
[checkpoint]
every_steps = 0
keep = 1
[cluster]
learner_addr = "127.0.0.1:0"
actors = 1
reward_workers = 1
actor_batch = {actor_batch}
leases_per_actor = {leases}
[metrics]
log_every_seconds = 10.0
"#,
        seed = run_seed(args, run),
        model = model.display(),
        prompts = prompts.display(),
        g = args.group_size,
        t = args.temperature,
        n = args.max_new_tokens,
        p = args.prompts_per_step,
        steps = steps_of(args, system),
        lr = args.lr,
    )
}

fn run_quill(
    args: &RlArgs,
    py: &Python,
    out: &Path,
    system: System,
    run: usize,
    job: &str,
) -> anyhow::Result<Outcome> {
    let name = if system == System::Sync {
        "quill-sync"
    } else {
        "quill-async"
    };
    let dir = run_dir(out, name, run);
    let config = dir.with_extension("toml");
    std::fs::write(&config, job)?;
    let log = dir.with_extension("log");
    let threads = (args.threads / 2).max(1);
    let started = Instant::now();
    stage(
        &format!(
            "{}: training {} steps",
            label(system, run, args),
            steps_of(args, system)
        ),
        || {
            let status = Command::new(std::env::current_exe()?)
                .args(["launch", "local", "--config"])
                .arg(&config)
                .arg("--output-dir")
                .arg(&dir)
                .args(["--threads", &threads.to_string()])
                .stdout(Stdio::from(std::fs::File::create(&log)?))
                .stderr(Stdio::from(std::fs::File::create(
                    log.with_extension("err"),
                )?))
                .status()?;
            if !status.success() {
                bail!("{} failed ({status}); see {}", system.name(), log.display());
            }
            Ok(())
        },
    )?;
    let wall_s = started.elapsed().as_secs_f64();
    let curve = quill_curve(&dir.join("metrics.jsonl"))?;
    let final_dir = latest_checkpoint(&dir.join("checkpoints"))
        .with_context(|| format!("no checkpoint under {}", dir.display()))?;
    let eval = evaluate(args, py, out, &final_dir, &dir, &label(system, run, args))?;
    Ok(outcome(system, run, wall_s, curve, eval, args.window))
}

/// The directory of run `run` (1-based) of the system called `name`: `name`, then
/// `name-2`, `name-3`, ...
fn run_dir(out: &Path, name: &str, run: usize) -> PathBuf {
    if run == 1 {
        out.join(name)
    } else {
        out.join(format!("{name}-{run}"))
    }
}

/// The optimiser steps of `system`'s runs.
fn steps_of(args: &RlArgs, system: System) -> u64 {
    match system {
        System::Trl => args.steps,
        System::Async | System::Sync => args.quill_steps.unwrap_or(args.steps),
    }
}

/// The sampling (and quill's prompt-order) seed of run `run` (1-based).
fn run_seed(args: &RlArgs, run: usize) -> u64 {
    args.seed + run as u64 - 1
}

fn run_trl(
    args: &RlArgs,
    py: &Python,
    out: &Path,
    model: &Path,
    run: usize,
) -> anyhow::Result<Outcome> {
    let dir = run_dir(out, "trl", run);
    let started = Instant::now();
    stage(
        &format!(
            "{}: training {} steps",
            label(System::Trl, run, args),
            args.steps
        ),
        || {
            py.call(
                "trl",
                &[
                    ("--model", path(model)),
                    ("--prompts", path(&out.join("prompts-rendered.jsonl"))),
                    ("--out", path(&dir)),
                    ("--group-size", args.group_size.to_string()),
                    ("--prompts-per-step", args.prompts_per_step.to_string()),
                    ("--max-new-tokens", args.max_new_tokens.to_string()),
                    ("--temperature", args.temperature.to_string()),
                    ("--lr", args.lr.to_string()),
                    ("--steps", args.steps.to_string()),
                    ("--threads", args.threads.to_string()),
                    ("--seed", run_seed(args, run).to_string()),
                    ("--l-max", L_MAX.to_string()),
                ],
                &dir.with_extension("log"),
            )
        },
    )?;
    let wall_s = started.elapsed().as_secs_f64();
    let curve = trl_curve(&dir.join("steps.jsonl"))?;
    let eval = evaluate(
        args,
        py,
        out,
        &dir.join("final"),
        &dir,
        &label(System::Trl, run, args),
    )?;
    Ok(outcome(System::Trl, run, wall_s, curve, eval, args.window))
}

fn evaluate(
    args: &RlArgs,
    py: &Python,
    out: &Path,
    model: &Path,
    run_dir: &Path,
    label: &str,
) -> anyhow::Result<Value> {
    stage(&format!("{label}: evaluating the final checkpoint"), || {
        py.call(
            "evaluate",
            &[
                ("--model", path(model)),
                ("--prompts", path(&out.join("prompts-rendered.jsonl"))),
                ("--samples", args.eval_samples.to_string()),
                ("--max-new-tokens", args.max_new_tokens.to_string()),
                ("--temperature", args.temperature.to_string()),
                ("--seed", args.seed.to_string()),
                ("--threads", args.threads.to_string()),
                ("--l-max", L_MAX.to_string()),
            ],
            &run_dir.with_extension("eval.log"),
        )
    })
}

fn outcome(
    system: System,
    run: usize,
    wall_s: f64,
    curve: Vec<Point>,
    eval: Value,
    window: usize,
) -> Outcome {
    let tail = &curve[curve.len().saturating_sub(window)..];
    Outcome {
        system,
        run,
        wall_s,
        train_s: curve.last().map_or(0.0, |p| p.elapsed_s),
        steps: curve.len(),
        tokens: curve.iter().map(|p| p.tokens).sum(),
        final_reward: tail.iter().map(|p| p.reward).sum::<f64>() / tail.len().max(1) as f64,
        eval,
        curve,
    }
}

/// Reads quill's step records: time since training started, mean length reward, tokens.
fn quill_curve(metrics: &Path) -> anyhow::Result<Vec<Point>> {
    read_curve(metrics, |r| {
        (r.get("kind")? == "step").then_some(())?;
        Some(Point {
            elapsed_s: r.get("elapsed_s")?.as_f64()?,
            reward: r.get("reward_length")?.as_f64()?,
            tokens: r.get("generated_tokens")?.as_u64()?,
        })
    })
}

/// Reads the TRL run's per-step lines.
fn trl_curve(steps: &Path) -> anyhow::Result<Vec<Point>> {
    read_curve(steps, |r| {
        Some(Point {
            elapsed_s: r.get("elapsed_s")?.as_f64()?,
            reward: r.get("reward_mean")?.as_f64()?,
            tokens: r.get("completion_tokens")?.as_u64()?,
        })
    })
}

fn read_curve(path: &Path, point: impl Fn(&Value) -> Option<Point>) -> anyhow::Result<Vec<Point>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut curve = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let record: Value = serde_json::from_str(line)
            .with_context(|| format!("{}: a line is not JSON", path.display()))?;
        curve.extend(point(&record));
    }
    if curve.is_empty() {
        bail!("{} holds no steps", path.display());
    }
    Ok(curve)
}

/// Seconds since training started at which the `window`-step moving average of the reward
/// first reaches `level`.
fn time_to(curve: &[Point], level: f64, window: usize) -> Option<f64> {
    (0..curve.len()).find_map(|i| {
        let from = (i + 1).saturating_sub(window);
        let slice = &curve[from..=i];
        let avg = slice.iter().map(|p| p.reward).sum::<f64>() / slice.len() as f64;
        (slice.len() == window.min(curve.len()) && avg >= level).then_some(curve[i].elapsed_s)
    })
}

/// A run's name in the report: the system's, numbered when systems run repeatedly.
fn label(system: System, run: usize, args: &RlArgs) -> String {
    if args.repeats > 1 {
        format!("{} #{run}", system.name())
    } else {
        system.name().to_owned()
    }
}

/// The median of `values` (the mean of the middle two for an even count); `None` if empty.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// Optimiser steps per second of training.
fn steps_per_s(o: &Outcome) -> f64 {
    o.steps as f64 / o.train_s.max(1e-9)
}

fn report(args: &RlArgs, outcomes: &[Outcome]) {
    println!(
        "\ntask: {} prompts{}, G {}, {} prompts/step, <= {} new tokens, T {}, lr {}, {} steps{}, {} threads each",
        args.prompts,
        if args.long_tail { " (long-tailed lengths)" } else { "" },
        args.group_size,
        args.prompts_per_step,
        args.max_new_tokens,
        args.temperature,
        args.lr,
        args.steps,
        match args.quill_steps {
            Some(q) if q != args.steps => format!(" ({q} for quill)"),
            _ => String::new(),
        },
        args.threads
    );
    print!(
        "{:<15} {:>6} {:>7} {:>8} {:>8} {:>10} {:>9} {:>8} {:>8} {:>9}",
        "system",
        "steps",
        "wall s",
        "train s",
        "steps/s",
        "samples/s",
        "tokens/s",
        "reward",
        "eval",
        "in range"
    );
    for level in &args.levels {
        print!(" {:>8}", format!("t({level})"));
    }
    println!();
    let samples_per_step = (args.group_size * args.prompts_per_step) as f64;
    for o in outcomes {
        let train = o.train_s.max(1e-9);
        let field = |k: &str| o.eval.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        print!(
            "{:<15} {:>6} {:>7.0} {:>8.0} {:>8.3} {:>10.2} {:>9.0} {:>8.3} {:>8.3} {:>8.0}%",
            label(o.system, o.run, args),
            o.steps,
            o.wall_s,
            o.train_s,
            steps_per_s(o),
            o.steps as f64 * samples_per_step / train,
            o.tokens as f64 / train,
            o.final_reward,
            field("reward_mean"),
            100.0 * field("in_range_share"),
        );
        for &level in &args.levels {
            match time_to(&o.curve, level, args.window) {
                Some(t) => print!(" {t:>7.0}s"),
                None => print!(" {:>8}", "-"),
            }
        }
        println!();
    }
    let runs = |s: System| outcomes.iter().filter(move |o| o.system == s);
    let trl_final = median(runs(System::Trl).map(|o| o.final_reward).collect());
    let trl_train = median(runs(System::Trl).map(|o| o.train_s).collect());
    if let (Some(trl_final), Some(trl_train)) = (trl_final, trl_train) {
        let (what, time) = if args.repeats > 1 {
            ("TRL's median final reward", "TRL's median training time")
        } else {
            ("TRL's final reward", "TRL's training time")
        };
        for system in [System::Async, System::Sync] {
            let reached: Vec<String> = runs(system)
                .map(|o| match time_to(&o.curve, trl_final, args.window) {
                    Some(t) => format!("{t:.0} s ({:.2}x)", t / trl_train.max(1e-9)),
                    None => "not reached".to_owned(),
                })
                .collect();
            if reached.is_empty() {
                continue;
            }
            let hits = reached.iter().filter(|r| *r != "not reached").count();
            println!(
                "{} reached {what} ({trl_final:.3}) in {hits} of {} runs; time as a share of {time} ({trl_train:.0} s): {}",
                system.name(),
                reached.len(),
                reached.join(", ")
            );
        }
    }
    let median_rate = |s: System| median(runs(s).map(steps_per_s).collect());
    if let (Some(a), Some(s)) = (median_rate(System::Async), median_rate(System::Sync)) {
        println!(
            "quill async vs sync: {:.2}x the steps/s{}",
            a / s,
            if args.repeats > 1 {
                " (medians over runs)"
            } else {
                ""
            }
        );
    }
}

/// The Python script and how to call it.
struct Python {
    python: PathBuf,
    script: PathBuf,
    threads: usize,
}

impl Python {
    /// Runs `rl_bench.py <command> <flags>` with its stderr in `log`; the JSON object
    /// on the last line of its stdout.
    fn call(&self, command: &str, flags: &[(&str, String)], log: &Path) -> anyhow::Result<Value> {
        let mut cmd = Command::new(&self.python);
        cmd.arg(&self.script).arg(command);
        for (flag, value) in flags {
            cmd.arg(flag).arg(value);
        }
        let output = cmd
            .env("OMP_NUM_THREADS", self.threads.to_string())
            .stderr(Stdio::from(std::fs::File::create(log)?))
            .output()
            .with_context(|| format!("running {}", self.python.display()))?;
        if !output.status.success() {
            bail!(
                "rl_bench.py {command} failed ({}); see {}",
                output.status,
                log.display()
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let last = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        serde_json::from_str(last)
            .with_context(|| format!("rl_bench.py {command} printed no JSON result: {last:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(rewards: &[f64]) -> Vec<Point> {
        rewards
            .iter()
            .enumerate()
            .map(|(i, &reward)| Point {
                elapsed_s: 10.0 * (i + 1) as f64,
                reward,
                tokens: 1,
            })
            .collect()
    }

    #[test]
    fn time_to_a_level_uses_a_full_trailing_window() {
        let c = curve(&[0.9, 0.0, 0.0, 0.6, 0.6, 0.6, 0.8]);
        assert_eq!(time_to(&c, 0.6, 3), Some(60.0));
        assert_eq!(time_to(&c, 0.66, 3), Some(70.0));
        assert_eq!(time_to(&c, 0.9, 3), None);
        assert_eq!(time_to(&c, 0.9, 1), Some(10.0));
    }

    #[test]
    fn the_median_of_odd_and_even_counts() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn the_task_has_long_tails_only_when_asked() {
        let plain = tasks(8, false);
        let tail = tasks(8, true);
        assert!(plain.iter().all(|t| t.hi <= 70));
        assert_eq!(tail.iter().filter(|t| t.hi > 70).count(), 2);
        assert!(tail[3]
            .question
            .contains(&format!("{} to {}", tail[3].lo, tail[3].hi)));
    }

    #[test]
    fn the_bench_jobs_are_valid_and_differ_only_in_staleness() {
        let args = RlArgs {
            out: PathBuf::from("/tmp/x"),
            steps: 150,
            quill_steps: Some(300),
            group_size: 8,
            prompts_per_step: 2,
            max_new_tokens: 256,
            temperature: 1.0,
            lr: 1e-3,
            threads: 2,
            seed: 0,
            prompts: 32,
            long_tail: false,
            eval_samples: 4,
            levels: vec![0.5],
            window: 10,
            repeats: 1,
            systems: vec![System::Async],
            python: None,
        };
        let parse = |s| {
            JobConfig::from_toml_str(
                &job_toml(&args, s, 2, Path::new("/m"), Path::new("/p.jsonl")),
                "t",
            )
            .unwrap()
        };
        let (a, s) = (parse(System::Async), parse(System::Sync));
        assert_eq!((a.grpo.max_staleness, s.grpo.max_staleness), (1, 0));
        assert_eq!(
            (a.job.seed, s.job.seed),
            (1, 1),
            "run 2 samples with seed + 1"
        );
        assert_eq!(
            (a.cluster.leases_per_actor, s.cluster.leases_per_actor),
            (4, 2)
        );
        assert_eq!((a.cluster.actor_batch, s.cluster.actor_batch), (32, 16));
        assert_eq!((a.grpo.steps, s.grpo.steps), (300, 300), "--quill-steps");
        assert_eq!(steps_of(&args, System::Trl), 150);
        assert_eq!(a.sampling.max_new_tokens, 256);
        assert_eq!(a.optimizer.lr, 1e-3);
        assert_eq!(a.rewards.format_weight, 0.0);
        assert!(a.template.render("q").ends_with(RESPONSE_PREFIX));
    }
}

//! Observability of a running job: `quill status` (table, `--json`, `--watch`) against a
//! real learner, actor and reward worker on loopback, each process's Prometheus
//! `/metrics` parsed line by line, and the bad inputs of both.

mod support;

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};
use support::job::{metrics_addr, quill_bin, set, wait_until_every, Proc, TestJob};
use support::{stderr, stdout};

/// Status line and body of `GET path` on `addr`.
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a full HTTP answer");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// `GET /metrics` at `addr`, which must answer 200: the body and its parsed samples.
fn metrics_page(addr: &str) -> (String, Vec<Sample>) {
    let (line, body) = http_get(addr, "/metrics");
    assert_eq!(line, "HTTP/1.1 200 OK", "{addr}");
    let samples = parse_openmetrics(&body);
    (body, samples)
}

/// One parsed sample line: `name{labels} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parses OpenMetrics text: `# HELP`/`# TYPE` comments, then `name{k="v",…} value` lines,
/// and `# EOF` last; panics on anything else, on a sample whose family has no `# TYPE`
/// line before it (a counter's samples are its family's name with `_total`), and on text
/// that does not end in `# EOF`.
fn parse_openmetrics(text: &str) -> Vec<Sample> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut typed = Vec::new();
    let mut samples = Vec::new();
    let body = text
        .strip_suffix("# EOF\n")
        .expect("OpenMetrics text ends in # EOF");
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            let sample_name = match kind {
                "gauge" => name.to_owned(),
                "counter" => format!("{name}_total"),
                _ => panic!("unexpected type in `{line}`"),
            };
            assert!(valid_name(name), "{line}");
            typed.push(sample_name);
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in `{line}`"));
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end in }");
                let labels = body
                    .split("\",")
                    .map(|pair| {
                        let (k, v) = pair.split_once("=\"").expect("k=\"v\"");
                        assert!(valid_name(k) && !k.contains(':'), "{line}");
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (name, labels)
            }
        };
        assert!(valid_name(name), "bad metric name in `{line}`");
        assert!(typed.iter().any(|t| t == name), "no # TYPE before `{line}`");
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    samples
}

fn find<'a>(samples: &'a [Sample], name: &str, label: (&str, &str)) -> &'a Sample {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels
                    .iter()
                    .any(|(k, v)| (k.as_str(), v.as_str()) == label)
        })
        .unwrap_or_else(|| panic!("no {name} with {label:?} in {samples:?}"))
}

/// Runs `quill status` (without backtraces, so an error is the one line a user sees).
fn status(learner: &str, token: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(quill_bin())
        .args(["status", "--learner", learner, "--token-file"])
        .arg(token)
        .args(extra)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("quill runs")
}

fn members_of<'a>(doc: &'a Value, role: &str) -> Vec<&'a Value> {
    doc["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == role)
        .collect()
}

/// Polls `quill status --json` until the actor generates, the reward worker has scored
/// and rank 0 has reported a step.
fn wait_for_a_busy_cluster(learner: &str, job: &TestJob, procs: &mut [&mut Proc]) -> Value {
    let (period, limit) = (Duration::from_millis(500), Duration::from_secs(600));
    wait_until_every(period, "a busy cluster", limit, procs, || {
        let out = status(learner, &job.token, &["--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let doc: Value = serde_json::from_str(&stdout(&out)).expect("--json prints JSON");
        let actor_busy = members_of(&doc, "ROLE_ACTOR")
            .iter()
            .any(|m| m["metrics"]["tokens_per_s"].as_f64().unwrap_or(0.0) > 0.0);
        let reward_busy = members_of(&doc, "ROLE_REWARD")
            .iter()
            .any(|m| m["metrics"]["scored_per_s"].as_f64().unwrap_or(0.0) > 0.0);
        let ranked = doc["ranks"].as_array().is_some_and(|r| !r.is_empty());
        (actor_busy && reward_busy && ranked).then_some(doc)
    })
}

#[test]
#[ignore = "slow tier: watches a training job for about a minute"]
fn status_and_metrics_show_a_running_job() {
    let job = TestJob::new(|t| {
        set(t, "grpo", "steps", 1000);
        set(t, "grpo", "prompts_per_step", 2);
        set(t, "sampling", "max_new_tokens", 48);
        set(t, "checkpoint", "every_steps", 0);
        set(t, "metrics", "peak_tflops", 0.5);
    });
    let mut learner = job.start_learner(&["--metrics-listen", "127.0.0.1:0"]);
    let addr = job.learner_addr(&mut learner);
    let learner_metrics = metrics_addr(&mut learner);
    let token = job.token.to_str().unwrap().to_owned();
    let member = |role: &str, name: &str| {
        let mut command = Command::new(quill_bin());
        command.args([
            role,
            "--learner",
            &addr,
            "--token-file",
            &token,
            "--name",
            name,
            "--metrics-listen",
            "127.0.0.1:0",
        ]);
        if role == "actor" {
            command.args(["--threads", "1"]);
        }
        Proc::spawn(command, &job.dir.path().join(format!("{role}.log")))
    };
    let mut reward = member("reward", "rw-obs");
    let mut actor = member("actor", "actor-obs");
    let reward_metrics = metrics_addr(&mut reward);
    let actor_metrics = metrics_addr(&mut actor);

    let doc = wait_for_a_busy_cluster(&addr, &job, &mut [&mut learner, &mut reward, &mut actor]);
    let rank0 = &doc["ranks"][0];
    assert_eq!(rank0["rank"], 0, "{doc:#}");
    assert_eq!(rank0["device"], "cpu");
    for key in ["step_seconds", "tokens_per_s", "idle_share"] {
        assert!(rank0[key].as_f64().unwrap() >= 0.0, "{key}: {rank0}");
    }
    let idle = rank0["idle_share"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&idle), "{rank0}");
    let mfu = rank0["mfu"].as_f64().expect("peak_tflops set: MFU known");
    assert!(mfu > 0.0 && mfu < 1.0, "{rank0}");
    assert!(doc["totals"]["generated_tokens_per_s"].as_f64().unwrap() > 0.0);

    // The table: job line, the actor and the reward worker by name with their rates, rank 0.
    // Rates cover the last heartbeat window, and an actor waiting for admission reports 0
    // for a window, so the table is read until every rate shows.
    let rate = |table: &str, name: &str, column: usize| -> f64 {
        table
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .and_then(|l| l.split_whitespace().nth(column)?.parse().ok())
            .unwrap_or(0.0)
    };
    let table = wait_until_every(
        Duration::from_millis(500),
        "a status table showing every rate",
        Duration::from_secs(120),
        &mut [&mut learner, &mut reward, &mut actor],
        || {
            let out = status(&addr, &job.token, &[]);
            assert!(out.status.success(), "{}", stderr(&out));
            let table = stdout(&out);
            let rates = [
                rate(&table, "actor-obs", 2),
                rate(&table, "rw-obs", 5),
                rate(&table, "0     cpu", 3),
            ];
            rates.iter().all(|&r| r > 0.0).then_some(table)
        },
    );
    assert!(table.starts_with("job: step "), "{table}");
    assert!(
        table.contains("\ncluster: 1 actors, 1 reward workers, 1 learner ranks"),
        "{table}"
    );
    let row = |name: &str| -> Vec<String> {
        table
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row:\n{table}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let reward_row = row("rw-obs");
    assert!(
        reward_row[2].parse::<f64>().unwrap() > 0.0,
        "reward latency: {table}"
    );
    let rank_row = row("0     cpu");
    assert!(
        rank_row[4].ends_with('%') && rank_row[5].ends_with('%'),
        "{table}"
    );

    // --watch redraws until stopped.
    let watch_log = job.dir.path().join("watch.log");
    let mut watch = Command::new(quill_bin());
    watch.args([
        "status",
        "--learner",
        &addr,
        "--token-file",
        &token,
        "--watch",
        "0.3",
    ]);
    let mut watching = Proc::spawn(watch, &watch_log);
    let started = Instant::now();
    while watching.log().matches("job: step ").count() < 3 && started.elapsed().as_secs() < 60 {
        assert!(
            watching.child.try_wait().unwrap().is_none(),
            "{}",
            watching.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let drawn = watching.log();
    assert!(
        watching.child.try_wait().unwrap().is_none(),
        "--watch keeps running"
    );
    drop(watching);
    assert!(drawn.matches("\x1b[2J\x1b[H").count() >= 3, "{drawn}");
    assert!(drawn.matches("job: step ").count() >= 3, "{drawn}");

    // Every process's /metrics is valid OpenMetrics text with the expected series; the
    // learner's is read until its cluster rate (last heartbeat window) shows generation.
    let (body, samples) = wait_until_every(
        Duration::from_millis(500),
        "a learner /metrics page showing generation",
        Duration::from_secs(120),
        &mut [&mut learner, &mut reward, &mut actor],
        || {
            let (body, samples) = metrics_page(&learner_metrics);
            let generated = find(
                &samples,
                "quill_cluster_generated_tokens_per_second",
                ("role", "learner"),
            );
            (generated.value > 0.0).then_some((body, samples))
        },
    );
    find(&samples, "quill_member_tokens_per_s", ("role", "actor"));
    find(&samples, "quill_member_latency_ms", ("role", "reward"));
    find(
        &samples,
        "quill_member_heartbeat_age_seconds",
        ("name", "actor-obs"),
    );
    find(&samples, "quill_rank_step_seconds", ("rank", "0"));
    find(&samples, "quill_rank_mfu", ("device", "cpu"));
    let accepted = find(&samples, "quill_accepted_groups_total", ("role", "learner"));
    assert!(accepted.value >= 2.0, "{body}");
    assert!(
        body.contains("# TYPE quill_accepted_groups counter\n"),
        "{body}"
    );

    let (body, samples) = metrics_page(&actor_metrics);
    let produced = find(&samples, "quill_generated_tokens_total", ("role", "actor"));
    assert!(produced.value > 0.0, "{body}");
    find(&samples, "quill_actor_tokens_per_s", ("role", "actor"));
    find(&samples, "quill_weights_version", ("role", "actor"));

    let (body, samples) = metrics_page(&reward_metrics);
    let scored = find(
        &samples,
        "quill_reward_scored_groups_total",
        ("role", "reward"),
    );
    assert!(scored.value >= 1.0, "{body}");
    find(&samples, "quill_reward_latency_ms", ("role", "reward"));
    find(&samples, "quill_reward_queue_depth", ("role", "reward"));

    for addr in [&learner_metrics, &actor_metrics, &reward_metrics] {
        let (line, _) = http_get(addr, "/nope");
        assert_eq!(line, "HTTP/1.1 404 Not Found", "{addr}");
    }

    // A wrong token is refused with a line naming the flag.
    let wrong = job.dir.path().join("wrong-token");
    std::fs::write(&wrong, "not-the-token").unwrap();
    let out = status(&addr, &wrong, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--token-file") && err.contains("refused the job token"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn status_refuses_bad_addresses_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0k3n").unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = free.local_addr().unwrap().to_string();
    drop(free);
    let cases: [(&str, &str); 4] = [
        (closed.as_str(), "cannot reach the learner"),
        ("no-port-here", "is not HOST:PORT"),
        ("127.0.0.1:http", "is not HOST:PORT"),
        ("127.0.0.1:70000", "is not HOST:PORT"),
    ];
    for (addr, expected) in cases {
        let out = status(addr, &token, &[]);
        assert!(!out.status.success(), "{addr}");
        let err = stderr(&out);
        assert!(
            err.contains("--learner") && err.contains(expected),
            "{addr}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    let missing = dir.path().join("absent");
    let out = status("127.0.0.1:1", &missing, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--token-file"), "{}", stderr(&out));
    let out = status("127.0.0.1:1", &token, &["--watch", "0"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--watch"), "{}", stderr(&out));
}

#[test]
fn a_bad_metrics_address_names_its_flag() {
    let job = TestJob::new(|_| {});
    let mut learner = job.start_learner(&["--metrics-listen", "not-an-address"]);
    let status = learner.wait(Duration::from_secs(120));
    assert!(!status.success());
    let log = learner.log();
    assert!(
        log.contains("--metrics-listen") && log.contains("not-an-address"),
        "{log}"
    );
}

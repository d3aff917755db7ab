//! Renders the learner's status document (`Learner.Status`) as the human-readable view of
//! `quill status`: a job line with the cluster totals, then one table each for actors,
//! reward workers and learner ranks.

use quill_proto::status::{MemberStatus, RoleMetrics, StatusDocument};

/// The whole view of one status document.
pub fn render(doc: &StatusDocument) -> String {
    let mut out = job_lines(doc);
    let actors: Vec<Vec<String>> = doc
        .members
        .iter()
        .filter_map(|m| match &m.reported {
            RoleMetrics::Actor(metrics) => Some((m, metrics.as_ref())),
            RoleMetrics::Reward(_) => None,
        })
        .map(|(m, metrics)| {
            vec![
                m.name.clone(),
                m.id.clone(),
                fixed(metrics.map(|a| a.tokens_per_s), 0),
                format!(
                    "v{} (lag {})",
                    m.version,
                    doc.version.saturating_sub(m.version)
                ),
                fixed(metrics.map(|a| f64::from(a.groups_in_flight)), 0),
                heartbeat_age(m),
            ]
        })
        .collect();
    out.push_str("\nActors\n");
    out.push_str(&table(
        &[
            "name",
            "member",
            "tok/s",
            "weights",
            "groups in flight",
            "heartbeat s ago",
        ],
        &actors,
    ));

    let rewards: Vec<Vec<String>> = doc
        .members
        .iter()
        .filter_map(|m| match &m.reported {
            RoleMetrics::Reward(metrics) => Some((m, metrics.as_ref())),
            RoleMetrics::Actor(_) => None,
        })
        .map(|(m, metrics)| {
            vec![
                m.name.clone(),
                m.id.clone(),
                fixed(metrics.map(|r| r.latency_ms), 1),
                fixed(metrics.map(|r| f64::from(r.queue_depth)), 0),
                fixed(metrics.map(|r| f64::from(r.in_flight)), 0),
                fixed(metrics.map(|r| r.scored_per_s), 2),
                heartbeat_age(m),
            ]
        })
        .collect();
    out.push_str("\nReward workers\n");
    out.push_str(&table(
        &[
            "name",
            "member",
            "latency ms",
            "queue",
            "in flight",
            "scored/s",
            "heartbeat s ago",
        ],
        &rewards,
    ));

    let ranks: Vec<Vec<String>> = doc
        .ranks
        .iter()
        .map(|r| {
            vec![
                r.rank.to_string(),
                r.device.clone(),
                format!("{:.2}", r.step_seconds),
                format!("{:.0}", r.tokens_per_s),
                percent(r.mfu, 2),
                percent(Some(r.idle_share), 0),
            ]
        })
        .collect();
    out.push_str("\nLearner ranks\n");
    out.push_str(&table(
        &["rank", "device", "step s", "tok/s", "MFU", "idle"],
        &ranks,
    ));
    out
}

/// The job line and the cluster-totals line.
fn job_lines(doc: &StatusDocument) -> String {
    let step = match &doc.step {
        Some(s) => format!("step {}/{}", s.step, s.steps_total),
        None => "no step yet".to_owned(),
    };
    let state = if doc.finished { " | finished" } else { "" };
    let totals = &doc.totals;
    format!(
        "job: {step} | weights v{} | elapsed {} | {} groups/s{state}\n\
         cluster: {} actors, {} reward workers, {} learner ranks | generated {:.0} tok/s | trained {:.0} tok/s | queue {}/{}\n",
        doc.version,
        duration(doc.uptime_s),
        fixed(doc.step.as_ref().map(|s| s.rollout_groups_per_s), 2),
        totals.actors,
        totals.reward_workers,
        totals.ranks,
        totals.generated_tokens_per_s,
        totals.trained_tokens_per_s,
        totals.queue_depth,
        totals.queue_capacity,
    )
}

/// Seconds since the member's last call, one decimal.
fn heartbeat_age(m: &MemberStatus) -> String {
    format!("{:.1}", m.seconds_since_heartbeat)
}

/// Left-aligned columns two spaces apart, a header row first; `(none)` for no rows.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    if rows.is_empty() {
        return "  (none)\n".to_owned();
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("  {}\n", padded.join("  ").trim_end())
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `value` with `digits` decimals, `-` when absent.
fn fixed(value: Option<f64>, digits: usize) -> String {
    value.map_or("-".to_owned(), |v| format!("{v:.digits$}"))
}

/// A share as a percentage, `n/a` when absent (unknown).
fn percent(value: Option<f64>, digits: usize) -> String {
    value.map_or("n/a".to_owned(), |v| format!("{:.digits$}%", v * 100.0))
}

/// Seconds as `1h02m03s`, `4m05s` or `6s`.
fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, min, sec) => format!("{min}m{sec:02}s"),
        (h, min, sec) => format!("{h}h{min:02}m{sec:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quill_proto::status::{ClusterTotals, StepMetrics};
    use quill_proto::{ActorMetrics, RankMetrics, RewardMetrics};

    fn member(id: &str, name: &str, version: u64, age: f64, reported: RoleMetrics) -> MemberStatus {
        MemberStatus {
            id: id.into(),
            name: name.into(),
            address: String::new(),
            relay_address: String::new(),
            receiving_version: 0,
            weight_source: String::new(),
            version,
            seconds_since_heartbeat: age,
            reported,
        }
    }

    fn doc() -> StatusDocument {
        StatusDocument {
            step: Some(StepMetrics {
                step: 12,
                steps_total: 60,
                rollout_groups_per_s: 3.456,
                ..StepMetrics::default()
            }),
            version: 12,
            uptime_s: 83.4,
            totals: ClusterTotals {
                actors: 1,
                reward_workers: 1,
                ranks: 1,
                generated_tokens_per_s: 1234.4,
                trained_tokens_per_s: 567.0,
                scored_groups_per_s: 1.5,
                queue_depth: 1,
                queue_capacity: 64,
            },
            members: vec![
                member(
                    "actor-1",
                    "gpu-node-7",
                    10,
                    0.42,
                    RoleMetrics::Actor(Some(ActorMetrics {
                        tokens_per_s: 1234.4,
                        groups_in_flight: 2,
                        ..ActorMetrics::default()
                    })),
                ),
                member(
                    "reward-2",
                    "rw",
                    0,
                    1.0,
                    RoleMetrics::Reward(Some(RewardMetrics {
                        latency_ms: 35.6,
                        queue_depth: 3,
                        in_flight: 1,
                        scored_per_s: 1.5,
                    })),
                ),
            ],
            ranks: vec![
                RankMetrics {
                    rank: 0,
                    device: "cuda:0 (NVIDIA H100 80GB HBM3)".into(),
                    step_seconds: 0.5,
                    tokens_per_s: 567.0,
                    mfu: Some(0.4123),
                    idle_share: 0.25,
                },
                RankMetrics {
                    rank: 1,
                    device: "cpu".into(),
                    step_seconds: 0.75,
                    tokens_per_s: 10.0,
                    mfu: None,
                    idle_share: 0.5,
                },
            ],
            ..StatusDocument::default()
        }
    }

    #[test]
    fn renders_job_totals_and_every_table() {
        let expected = "\
job: step 12/60 | weights v12 | elapsed 1m23s | 3.46 groups/s
cluster: 1 actors, 1 reward workers, 1 learner ranks | generated 1234 tok/s | trained 567 tok/s | queue 1/64

Actors
  name        member   tok/s  weights      groups in flight  heartbeat s ago
  gpu-node-7  actor-1  1234   v10 (lag 2)  2                 0.4

Reward workers
  name  member    latency ms  queue  in flight  scored/s  heartbeat s ago
  rw    reward-2  35.6        3      1          1.50      1.0

Learner ranks
  rank  device                          step s  tok/s  MFU     idle
  0     cuda:0 (NVIDIA H100 80GB HBM3)  0.50    567    41.23%  25%
  1     cpu                             0.75    10     n/a     50%
";
        assert_eq!(render(&doc()), expected);
    }

    #[test]
    fn an_early_or_finished_job_still_renders() {
        let early = StatusDocument {
            finished: true,
            members: vec![member("actor-1", "a", 0, 0.5, RoleMetrics::Actor(None))],
            ..StatusDocument::default()
        };
        let text = render(&early);
        assert!(
            text.starts_with(
                "job: no step yet | weights v0 | elapsed 0s | - groups/s | finished\n"
            ),
            "{text}"
        );
        assert!(text.contains("cluster: 0 actors"), "{text}");
        assert!(
            text.contains("  a     actor-1  -      v0 (lag 0)  -"),
            "{text}"
        );
        assert_eq!(text.matches("  (none)\n").count(), 2, "{text}");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(6.9), "6s");
        assert_eq!(duration(245.0), "4m05s");
        assert_eq!(duration(3723.0), "1h02m03s");
    }
}

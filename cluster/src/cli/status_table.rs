//! Renders the learner's status document (`Learner.Status`) as the human-readable view of
//! `quill status`: a job line with the cluster totals, then one table each for actors,
//! reward workers and learner ranks.

use serde_json::Value;

/// The whole view of one status document.
pub fn render(doc: &Value) -> String {
    let mut out = job_lines(doc);
    let members: &[Value] = doc
        .get("members")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let version = num(doc, "version").unwrap_or(0.0);

    let actors: Vec<Vec<String>> = of_role(members, "ROLE_ACTOR")
        .map(|m| {
            let v = num(m, "version").unwrap_or(0.0);
            vec![
                str_of(m, "name").to_owned(),
                str_of(m, "id").to_owned(),
                fixed(metric(m, "tokens_per_s"), 0),
                format!("v{v:.0} (lag {:.0})", (version - v).max(0.0)),
                fixed(metric(m, "groups_in_flight"), 0),
                fixed(num(m, "seconds_since_heartbeat"), 1),
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

    let rewards: Vec<Vec<String>> = of_role(members, "ROLE_REWARD")
        .map(|m| {
            vec![
                str_of(m, "name").to_owned(),
                str_of(m, "id").to_owned(),
                fixed(metric(m, "latency_ms"), 1),
                fixed(metric(m, "queue_depth"), 0),
                fixed(metric(m, "in_flight"), 0),
                fixed(metric(m, "scored_per_s"), 2),
                fixed(num(m, "seconds_since_heartbeat"), 1),
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
        .get("ranks")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|r| {
            vec![
                fixed(num(r, "rank"), 0),
                str_of(r, "device").to_owned(),
                fixed(num(r, "step_seconds"), 2),
                fixed(num(r, "tokens_per_s"), 0),
                percent(num(r, "mfu"), 2),
                percent(num(r, "idle_share"), 0),
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
fn job_lines(doc: &Value) -> String {
    let step = match (num(doc, "step"), num(doc, "steps_total")) {
        (Some(step), Some(total)) => format!("step {step:.0}/{total:.0}"),
        _ => "no step yet".to_owned(),
    };
    let state = if doc.get("finished").and_then(Value::as_bool) == Some(true) {
        " | finished"
    } else {
        ""
    };
    let totals = doc.get("totals").unwrap_or(&Value::Null);
    format!(
        "job: {step} | weights v{} | elapsed {} | {} groups/s{state}\n\
         cluster: {} actors, {} reward workers, {} learner ranks | generated {} tok/s | trained {} tok/s | queue {}/{}\n",
        fixed(num(doc, "version"), 0),
        duration(num(doc, "uptime_s")),
        fixed(num(doc, "rollout_groups_per_s"), 2),
        fixed(num(totals, "actors"), 0),
        fixed(num(totals, "reward_workers"), 0),
        fixed(num(totals, "ranks"), 0),
        fixed(num(totals, "generated_tokens_per_s"), 0),
        fixed(num(totals, "trained_tokens_per_s"), 0),
        fixed(num(totals, "queue_depth"), 0),
        fixed(num(totals, "queue_capacity"), 0),
    )
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

/// The members whose `role` is `role`.
fn of_role<'a>(members: &'a [Value], role: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    members.iter().filter(move |m| str_of(m, "role") == role)
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn metric(member: &Value, key: &str) -> Option<f64> {
    member.get("metrics").and_then(|m| num(m, key))
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
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
fn duration(seconds: Option<f64>) -> String {
    let Some(seconds) = seconds else {
        return "-".to_owned();
    };
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
    use serde_json::json;

    fn doc() -> Value {
        json!({
            "step": 12, "steps_total": 60, "version": 12, "uptime_s": 83.4,
            "rollout_groups_per_s": 3.456, "finished": false,
            "totals": {"actors": 1, "reward_workers": 1, "ranks": 1,
                       "generated_tokens_per_s": 1234.4, "trained_tokens_per_s": 567.0,
                       "queue_depth": 1, "queue_capacity": 64},
            "members": [
                {"id": "actor-1", "role": "ROLE_ACTOR", "name": "gpu-node-7", "version": 10,
                 "seconds_since_heartbeat": 0.42,
                 "metrics": {"tokens_per_s": 1234.4, "groups_in_flight": 2.0}},
                {"id": "reward-2", "role": "ROLE_REWARD", "name": "rw", "version": 0,
                 "seconds_since_heartbeat": 1.0,
                 "metrics": {"latency_ms": 35.6, "queue_depth": 3.0, "in_flight": 1.0,
                             "scored_per_s": 1.5}}
            ],
            "ranks": [
                {"rank": 0, "device": "cuda:0 (NVIDIA H100 80GB HBM3)", "step_seconds": 0.5,
                 "tokens_per_s": 567.0, "mfu": 0.4123, "idle_share": 0.25},
                {"rank": 1, "device": "cpu", "step_seconds": 0.75, "tokens_per_s": 10.0,
                 "mfu": null, "idle_share": 0.5}
            ]
        })
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
        let text = render(&json!({"version": 0, "finished": true, "members": []}));
        assert!(
            text.starts_with("job: no step yet | weights v0 | elapsed - | - groups/s | finished\n"),
            "{text}"
        );
        assert!(text.contains("cluster: - actors"), "{text}");
        assert_eq!(text.matches("  (none)\n").count(), 3, "{text}");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(Some(6.9)), "6s");
        assert_eq!(duration(Some(245.0)), "4m05s");
        assert_eq!(duration(Some(3723.0)), "1h02m03s");
        assert_eq!(duration(None), "-");
    }
}

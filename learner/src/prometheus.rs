//! The learner's Prometheus page: the job's progress, the cluster totals, every live
//! member's heartbeat metrics (labels `role`, `member`, `name`) and every learner rank's
//! step metrics (labels `rank`, `device`).

use crate::hub::Hub;
use quill_telemetry::{render_prometheus, Family};

/// Renders the learner's `/metrics` page from the hub's status document.
pub fn render(hub: &Hub) -> String {
    let doc = hub.status_document();
    let own = [("role", "learner")];
    let mut families = vec![
        Family::gauge(
            "quill_weights_version",
            "Version of the weights being served.",
        )
        .with(&own, doc.version as f64),
        Family::gauge("quill_uptime_seconds", "Seconds since the learner started.")
            .with(&own, doc.uptime_s),
        Family::counter("quill_accepted_groups_total", "Scored groups accepted.")
            .with(&own, doc.accepted_groups as f64),
        Family::counter(
            "quill_duplicate_groups_total",
            "Scored groups delivered again (no-ops).",
        )
        .with(&own, doc.duplicate_groups as f64),
    ];
    let mut rejected = Family::counter(
        "quill_rejected_groups_total",
        "Scored groups refused or dropped, by reason.",
    );
    for (reason, count) in &doc.rejected {
        rejected.push(
            &[("role", "learner"), ("reason", reason.as_str())],
            *count as f64,
        );
    }
    families.push(rejected);
    let mut step = Family::gauge("quill_step", "Optimiser steps done.");
    let mut planned = Family::gauge("quill_steps_planned", "Optimiser steps the job runs.");
    if let Some(latest) = &doc.step {
        step.push(&own, latest.step as f64);
        planned.push(&own, latest.steps_total as f64);
    }
    families.extend([step, planned]);
    let latest = doc.step.clone().unwrap_or_default();
    for gauge in latest.gauges() {
        let mut family = Family::gauge(&format!("quill_step_{}", gauge.name), gauge.help);
        // A non-finite value (a skipped step) is left out, as the step record leaves it.
        if doc.step.is_some() && gauge.value.is_finite() {
            family.push(&own, gauge.value);
        }
        families.push(family);
    }

    let totals = doc.totals;
    for (name, help, value) in [
        ("actors", "Live actors.", totals.actors as f64),
        (
            "reward_workers",
            "Live reward workers.",
            totals.reward_workers as f64,
        ),
        ("ranks", "Learner ranks reporting.", totals.ranks as f64),
        (
            "generated_tokens_per_second",
            "Generated tokens/s summed over actors.",
            totals.generated_tokens_per_s,
        ),
        (
            "trained_tokens_per_second",
            "Trained tokens/s summed over learner ranks.",
            totals.trained_tokens_per_s,
        ),
        (
            "scored_groups_per_second",
            "Scored groups/s summed over reward workers.",
            totals.scored_groups_per_s,
        ),
        (
            "ingest_queue_depth",
            "Accepted groups waiting for the trainer.",
            totals.queue_depth as f64,
        ),
        (
            "ingest_queue_capacity",
            "Bound of the ingest queue.",
            totals.queue_capacity as f64,
        ),
    ] {
        families.push(Family::gauge(&format!("quill_cluster_{name}"), help).with(&own, value));
    }

    let mut age = Family::gauge(
        "quill_member_heartbeat_age_seconds",
        "Seconds since the member's last call.",
    );
    let mut member_version = Family::gauge(
        "quill_member_weights_version",
        "Weights version the member runs.",
    );
    let mut lag = Family::gauge(
        "quill_member_weights_lag",
        "Versions the member is behind the learner.",
    );
    let mut reported: std::collections::BTreeMap<&str, Family> = Default::default();
    for m in &doc.members {
        let labels = [
            ("role", role_label(m.reported.role())),
            ("member", m.id.as_str()),
            ("name", m.name.as_str()),
        ];
        age.push(&labels, m.seconds_since_heartbeat);
        member_version.push(&labels, m.version as f64);
        lag.push(&labels, doc.version.saturating_sub(m.version) as f64);
        for gauge in m.reported.gauges() {
            reported
                .entry(gauge.name)
                .or_insert_with(|| {
                    Family::gauge(&format!("quill_member_{}", gauge.name), gauge.help)
                })
                .push(&labels, gauge.value);
        }
    }
    families.extend([age, member_version, lag]);
    families.extend(reported.into_values());

    let mut ranked: std::collections::BTreeMap<&str, Family> = Default::default();
    for rank in &doc.ranks {
        let id = rank.rank.to_string();
        let labels = [("rank", id.as_str()), ("device", rank.device.as_str())];
        for gauge in rank.gauges() {
            ranked
                .entry(gauge.name)
                .or_insert_with(|| Family::gauge(&format!("quill_rank_{}", gauge.name), gauge.help))
                .push(&labels, gauge.value);
        }
    }
    families.extend(ranked.into_values());
    render_prometheus(families)
}

/// The `role` label of a member.
fn role_label(role: quill_proto::Role) -> &'static str {
    match role {
        quill_proto::Role::Actor => "actor",
        quill_proto::Role::Reward => "reward",
        quill_proto::Role::Unspecified => "unspecified",
    }
}

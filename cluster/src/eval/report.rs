//! The summary of a run: length and critic scores overall and per category, win/tie/loss
//! counts per opponent, and Bradley–Terry ratings on the Elo scale with bootstrap
//! intervals, from the per-sample records.

use super::pairwise::Tally;
use super::rating::{self, Game};
use super::samples::SampleRecord;
use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// One evaluated model: its name and its training step, when known.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The name in the records.
    pub name: String,
    /// The training step (a folder named step-N).
    pub step: Option<u64>,
}

/// A model's scores.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    /// The model's name.
    pub model: String,
    /// Its training step, when known.
    pub step: Option<u64>,
    /// Prompts with a record.
    pub samples: usize,
    /// Mean length score (0–100) over prompts with a required length.
    pub length_score: Option<f64>,
    /// Mean length score per category.
    pub length_score_by_type: BTreeMap<String, f64>,
    /// Prompts with a length score.
    pub length_scored: usize,
    /// Mean answer length in words.
    pub output_length_mean: f64,
    /// Mean critic score (1–10) over readable scores.
    pub critic_score: Option<f64>,
    /// Mean critic score per category.
    pub critic_score_by_type: BTreeMap<String, f64>,
    /// Answers with a readable critic score.
    pub critic_scored: usize,
    /// Answers whose critic reply had no readable score.
    pub critic_unparsable: usize,
    /// Win/tie/loss counts per opponent.
    pub pairwise: BTreeMap<String, Tally>,
    /// (wins + ½ ties) / decided comparisons, per opponent.
    pub win_rate: BTreeMap<String, f64>,
    /// Bradley–Terry rating on the Elo scale.
    pub elo: Option<f64>,
    /// Its 95% bootstrap interval.
    pub elo_ci: Option<[f64; 2]>,
}

impl ModelSummary {
    /// The categories with a length or a critic score, sorted.
    pub fn types(&self) -> Vec<&String> {
        let mut kinds: Vec<&String> = self
            .length_score_by_type
            .keys()
            .chain(self.critic_score_by_type.keys())
            .collect();
        kinds.sort();
        kinds.dedup();
        kinds
    }
}

/// One player's rating.
#[derive(Debug, Clone, Serialize)]
pub struct Rating {
    /// A model or an opponent.
    pub player: String,
    /// Its rating (the anchor has 1000).
    pub elo: f64,
    /// Its 95% bootstrap interval.
    pub ci: Option<[f64; 2]>,
}

/// The summary of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Prompts evaluated per model.
    pub prompts: usize,
    /// Per model.
    pub models: Vec<ModelSummary>,
    /// The opponent anchored at 1000.
    pub anchor: Option<String>,
    /// Every rated player, best first.
    pub ratings: Vec<Rating>,
    /// Whether the ratings needed a virtual tie per player (someone won or lost all).
    pub ratings_regularised: bool,
    /// Bootstrap rounds.
    pub bootstrap: usize,
    /// The bootstrap's seed.
    pub bootstrap_seed: u64,
    /// Pairwise verdicts whose reply could not be read, over all models.
    pub unparsable_verdicts: usize,
    /// Pairwise verdicts asked for, over all models.
    pub verdicts: usize,
    /// Critic replies whose score could not be read, over all models.
    pub unparsable_critic_scores: usize,
    /// What to keep in mind when reading the numbers.
    pub notes: Vec<String>,
}

/// The results file: the summary and every record.
#[derive(Debug, Clone, Serialize)]
pub struct Results<'a> {
    /// The summary.
    pub summary: Summary,
    /// Every sample's record, per model in prompt order.
    pub samples: Vec<&'a SampleRecord>,
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

fn means_by_type(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    let mut groups: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (kind, value) in pairs {
        groups.entry((*kind).to_owned()).or_default().push(*value);
    }
    groups
        .into_iter()
        .filter_map(|(k, v)| mean(&v).map(|m| (k, m)))
        .collect()
}

/// Summarises `records` (each model's, in prompt order). `opponents` lists the pairwise
/// opponents in order; the first one anyone was compared with is the anchor.
pub fn summarise(
    models: &[ModelInfo],
    records: &[Vec<&SampleRecord>],
    opponents: &[String],
    bootstrap: usize,
    bootstrap_seed: u64,
) -> Summary {
    let mut summaries = Vec::with_capacity(models.len());
    let (mut verdicts, mut unparsable_verdicts, mut unparsable_critic) = (0, 0, 0);
    for (info, records) in models.iter().zip(records) {
        let lengths: Vec<(&str, f64)> = records
            .iter()
            .filter_map(|r| r.length_score.map(|s| (r.kind.as_str(), s)))
            .collect();
        let critic: Vec<(&str, f64)> = records
            .iter()
            .filter_map(|r| r.critic.as_ref()?.score.map(|s| (r.kind.as_str(), s)))
            .collect();
        let critic_unparsable = records
            .iter()
            .filter(|r| r.critic.as_ref().is_some_and(|c| c.score.is_none()))
            .count();
        let mut pairwise: BTreeMap<String, Tally> = BTreeMap::new();
        for comparison in records.iter().flat_map(|r| &r.pairwise) {
            pairwise
                .entry(comparison.opponent.clone())
                .or_default()
                .add(comparison.outcome, comparison.unparsable);
            verdicts += 2;
        }
        unparsable_verdicts += pairwise
            .values()
            .map(|t| t.unparsable_verdicts)
            .sum::<usize>();
        unparsable_critic += critic_unparsable;
        let output_lengths: Vec<f64> = records.iter().map(|r| r.output_length as f64).collect();
        let values = |pairs: &[(&str, f64)]| pairs.iter().map(|p| p.1).collect::<Vec<f64>>();
        summaries.push(ModelSummary {
            model: info.name.clone(),
            step: info.step,
            samples: records.len(),
            length_score: mean(&values(&lengths)),
            length_score_by_type: means_by_type(&lengths),
            length_scored: lengths.len(),
            output_length_mean: mean(&output_lengths).unwrap_or(0.0),
            critic_score: mean(&values(&critic)),
            critic_score_by_type: means_by_type(&critic),
            critic_scored: critic.len(),
            critic_unparsable,
            win_rate: pairwise
                .iter()
                .filter_map(|(k, t)| t.win_rate().map(|w| (k.clone(), w)))
                .collect(),
            pairwise,
            elo: None,
            elo_ci: None,
        });
    }
    let used: Vec<&String> = opponents
        .iter()
        .filter(|o| summaries.iter().any(|s| s.pairwise.contains_key(*o)))
        .collect();
    let mut notes = Vec::new();
    let (mut ratings, mut regularised) = (Vec::new(), false);
    let anchor = used.first().map(|a| (*a).clone());
    if anchor.is_some() {
        let players: Vec<String> = models
            .iter()
            .map(|m| m.name.clone())
            .chain(used.iter().map(|o| (*o).clone()))
            .collect();
        let index = |name: &str| players.iter().position(|p| p == name).expect("a player");
        let mut groups: BTreeMap<&str, Vec<Game>> = BTreeMap::new();
        for (m, records) in records.iter().enumerate() {
            for record in records {
                for c in &record.pairwise {
                    if let Some(outcome) = c.outcome {
                        groups.entry(record.id.as_str()).or_default().push(Game {
                            a: m,
                            b: index(&c.opponent),
                            score_a: outcome.points(),
                        });
                    }
                }
            }
        }
        let groups: Vec<Vec<Game>> = groups.into_values().collect();
        let all: Vec<Game> = groups.iter().flatten().copied().collect();
        let anchor_index = models.len();
        let fit = rating::fit(players.len(), anchor_index, &all);
        regularised = fit.regularised;
        let intervals = rating::bootstrap(
            players.len(),
            anchor_index,
            &groups,
            bootstrap,
            bootstrap_seed,
        );
        for (p, name) in players.iter().enumerate() {
            if let Some(elo) = fit.ratings[p] {
                let ci = intervals[p].map(|(lo, hi)| [lo, hi]);
                if let Some(summary) = summaries.get_mut(p) {
                    summary.elo = Some(elo);
                    summary.elo_ci = ci;
                }
                ratings.push(Rating {
                    player: name.clone(),
                    elo,
                    ci,
                });
            }
        }
        ratings.sort_by(|a, b| b.elo.total_cmp(&a.elo));
        if regularised {
            notes.push(
                "a player won or lost every comparison in part of the field, so every player got \
                 one virtual tie with the anchor to keep the ratings finite"
                    .to_owned(),
            );
        }
    }
    if unparsable_verdicts > 0 {
        notes.push(format!(
            "{unparsable_verdicts} of {verdicts} pairwise verdicts were unreadable and count as \
             no verdict (a comparison decides on its readable order alone, or is undecided)"
        ));
    }
    if unparsable_critic > 0 {
        notes.push(format!(
            "{unparsable_critic} critic replies had no readable score and are left out of the means"
        ));
    }
    Summary {
        prompts: records.iter().map(Vec::len).max().unwrap_or(0),
        models: summaries,
        anchor,
        ratings,
        ratings_regularised: regularised,
        bootstrap,
        bootstrap_seed,
        unparsable_verdicts,
        verdicts,
        unparsable_critic_scores: unparsable_critic,
        notes,
    }
}

/// Writes `OUT/results.json` through a temporary file.
pub fn write(
    out: &Path,
    summary: &Summary,
    per_model: &[Vec<&SampleRecord>],
) -> anyhow::Result<()> {
    let results = Results {
        summary: summary.clone(),
        samples: per_model.iter().flatten().copied().collect(),
    };
    let path = out.join("results.json");
    let temporary = out.join("results.json.tmp");
    std::fs::write(&temporary, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, &path).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Prints each model's scores, the ratings and the notes.
pub fn print(summary: &Summary) {
    let number =
        |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    for m in &summary.models {
        println!(
            "{}: {} samples, length score {} ({} scored), critic score {} ({} scored, {} unreadable), mean answer length {:.0} words",
            m.model,
            m.samples,
            number(m.length_score, 1),
            m.length_scored,
            number(m.critic_score, 2),
            m.critic_scored,
            m.critic_unparsable,
            m.output_length_mean
        );
        for kind in m.types() {
            println!(
                "  type {kind}: length score {}, critic score {}",
                number(m.length_score_by_type.get(kind).copied(), 1),
                number(m.critic_score_by_type.get(kind).copied(), 2)
            );
        }
        for (opponent, t) in &m.pairwise {
            println!(
                "  vs {opponent}: {} wins, {} ties, {} losses, {} undecided (win rate {}; {} unreadable verdicts)",
                t.win,
                t.tie,
                t.loss,
                t.undecided,
                number(t.win_rate(), 3),
                t.unparsable_verdicts
            );
        }
    }
    if let Some(anchor) = &summary.anchor {
        println!(
            "Elo (Bradley–Terry, {anchor} = 1000, 95% bootstrap intervals over {} rounds):",
            summary.bootstrap
        );
        for r in &summary.ratings {
            let ci =
                r.ci.map_or(String::new(), |[lo, hi]| format!(" [{lo:.0}, {hi:.0}]"));
            println!("  {}: {:.0}{ci}", r.player, r.elo);
        }
    }
    for note in &summary.notes {
        println!("note: {note}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::critic::CriticResult;
    use crate::eval::pairwise::Outcome;
    use crate::eval::samples::Comparison;

    fn record(
        id: &str,
        kind: &str,
        length: f64,
        critic: Option<f64>,
        outcome: Option<Outcome>,
    ) -> SampleRecord {
        SampleRecord {
            model: "m".into(),
            id: id.into(),
            idx: id.into(),
            kind: kind.into(),
            question: "q".into(),
            required_length: Some(100.0),
            output_length: 100,
            length_score: Some(length),
            response: String::new(),
            answer: String::new(),
            finish_reason: "stop".into(),
            critic: Some(CriticResult {
                score: critic,
                unparsable: critic.is_none().then(|| "no rating".into()),
            }),
            pairwise: vec![Comparison {
                opponent: "baseline".into(),
                verdicts: [Some("A".into()), None],
                outcome,
                unparsable: usize::from(outcome.is_none()) + 1,
            }],
        }
    }

    #[test]
    fn the_summary_agrees_with_the_records() {
        let records = [
            record("1", "story", 100.0, Some(8.0), Some(Outcome::Win)),
            record("2", "story", 50.0, None, Some(Outcome::Win)),
            record("3", "essay", 0.0, Some(4.0), Some(Outcome::Win)),
            record("4", "essay", 30.0, Some(6.0), Some(Outcome::Loss)),
            record("5", "essay", 20.0, Some(6.0), None),
        ];
        let models = [ModelInfo {
            name: "m".into(),
            step: Some(3),
        }];
        let summary = summarise(
            &models,
            &[records.iter().collect()],
            &["baseline".into()],
            200,
            1,
        );
        let m = &summary.models[0];
        assert_eq!(m.samples, 5);
        assert!((m.length_score.unwrap() - 40.0).abs() < 1e-9);
        assert_eq!(m.length_score_by_type["story"], 75.0);
        assert!((m.length_score_by_type["essay"] - 50.0 / 3.0).abs() < 1e-9);
        assert_eq!((m.critic_scored, m.critic_unparsable), (4, 1));
        assert_eq!(m.critic_score, Some(6.0));
        let tally = m.pairwise["baseline"];
        assert_eq!(
            (tally.win, tally.tie, tally.loss, tally.undecided),
            (3, 0, 1, 1)
        );
        assert_eq!(summary.unparsable_verdicts, 6);
        assert_eq!(summary.verdicts, 10);
        // 3 wins of 4: 400·log10(3) above the anchor.
        let expected = rating::ANCHOR_RATING + 400.0 * 3f64.log10();
        assert!((m.elo.unwrap() - expected).abs() < 1e-6);
        let [lo, hi] = m.elo_ci.unwrap();
        assert!(lo <= expected && expected <= hi);
        assert_eq!(summary.anchor.as_deref(), Some("baseline"));
        assert_eq!(summary.ratings[0].player, "m");
        assert_eq!(summary.ratings[1].elo, rating::ANCHOR_RATING);
        assert_eq!(summary.notes.len(), 2, "{:?}", summary.notes);
    }
}

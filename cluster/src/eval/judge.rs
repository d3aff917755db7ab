//! The judge: critic scores and pairwise verdicts in both orders from an
//! OpenAI-compatible endpoint, with the shipped or given templates.

use super::critic::{self, CriticResult};
use super::endpoint::{reply_text, Endpoint, Retry};
use super::pairwise;
use super::rubric::Rubric;
use super::samples::Comparison;
use super::Args;
use quill_reward_worker::judge::verdict::verdict;
use serde_json::{json, Value};

/// The shipped pairwise rubric (`configs/eval-pairwise.txt`).
const DEFAULT_PAIRWISE: &str = include_str!("../../../configs/eval-pairwise.txt");
/// The shipped critic criteria (`configs/eval-critic.txt`).
const DEFAULT_CRITIC: &str = include_str!("../../../configs/eval-critic.txt");
/// The slots of a pairwise rubric, in fill order.
const PAIRWISE_SLOTS: &[&str] = &["{question}", "{answer_a}", "{answer_b}"];

/// The judge and its templates.
pub struct Judging {
    endpoint: Endpoint,
    /// The critic's template (none with --no-critic).
    pub critic: Option<Rubric>,
    /// The pairwise template (none with --no-pairwise).
    pub pairwise: Option<Rubric>,
    max_tokens: usize,
    temperature: f64,
}

/// The judge, when --judge-endpoint is given.
pub fn from_args(args: &Args, retry: Retry) -> anyhow::Result<Option<Judging>> {
    let Some(url) = &args.judge_endpoint else {
        return Ok(None);
    };
    let critic = (!args.no_critic)
        .then(|| {
            Rubric::load(
                args.critic_template.as_deref(),
                DEFAULT_CRITIC,
                critic::SLOTS,
                "--critic-template",
            )
        })
        .transpose()?;
    let pairwise = (!args.no_pairwise)
        .then(|| {
            Rubric::load(
                args.pairwise_template.as_deref(),
                DEFAULT_PAIRWISE,
                PAIRWISE_SLOTS,
                "--pairwise-template",
            )
        })
        .transpose()?;
    Ok(Some(Judging {
        endpoint: Endpoint::new(
            "--judge-endpoint",
            url,
            &args.judge_model,
            args.judge_api_key_env.as_deref(),
            retry,
        )?,
        critic,
        pairwise,
        max_tokens: args.judge_max_tokens,
        temperature: args.judge_temperature,
    }))
}

impl Judging {
    fn body(&self, content: &str) -> Value {
        self.endpoint.body(
            content,
            json!({"max_tokens": self.max_tokens, "temperature": self.temperature}),
        )
    }

    /// The critic's score of `answer`.
    pub async fn critic(
        &self,
        rubric: &Rubric,
        question: &str,
        answer: &str,
    ) -> anyhow::Result<CriticResult> {
        let body = self.body(&rubric.fill(&[question, answer]));
        let reply = self
            .endpoint
            .ask(&body, |r| critic::parse_score(&reply_text(r)?))
            .await?;
        Ok(match reply {
            Ok(score) => CriticResult {
                score: Some(score),
                unparsable: None,
            },
            Err(reason) => CriticResult {
                score: None,
                unparsable: Some(reason),
            },
        })
    }

    /// `answer` against `other`, in both orders at once.
    pub async fn compare(
        &self,
        rubric: &Rubric,
        question: &str,
        answer: &str,
        other: &str,
        opponent: &str,
    ) -> anyhow::Result<Comparison> {
        let first = self.body(&rubric.fill(&[question, answer, other]));
        let second = self.body(&rubric.fill(&[question, other, answer]));
        let read = |r: &Value| verdict(&reply_text(r)?);
        let (first, second) = tokio::try_join!(
            self.endpoint.ask(&first, read),
            self.endpoint.ask(&second, read)
        )?;
        let name = |v: &Result<_, String>| {
            v.as_ref()
                .ok()
                .map(|&v| pairwise::verdict_name(v).to_owned())
        };
        Ok(Comparison {
            opponent: opponent.to_owned(),
            verdicts: [name(&first), name(&second)],
            outcome: pairwise::combine(
                first
                    .as_ref()
                    .ok()
                    .map(|&v| pairwise::order_outcome(v, true)),
                second
                    .as_ref()
                    .ok()
                    .map(|&v| pairwise::order_outcome(v, false)),
            ),
            unparsable: usize::from(first.is_err()) + usize::from(second.is_err()),
        })
    }
}

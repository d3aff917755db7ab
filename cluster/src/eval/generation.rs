//! Where answers come from: a local model on quill's engine (wrapped in the job's
//! think/answer template, as `quill generate` does) or an OpenAI-compatible endpoint;
//! and the answer inside a think/answer response.

use super::endpoint::{reply_text, Endpoint};
use super::prompts::Prompt;
use crate::cli::model_args::ModelArgs;
use anyhow::{anyhow, Context};
use quill_actor::{EngineConfig, EngineHandle, GenerationRequest, SamplingParams};
use quill_config::template::{PromptTemplate, DEFAULT_STOP_STRINGS};
use serde_json::{json, Value};

/// How to sample.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// Temperature (0: greedy).
    pub temperature: f64,
    /// Nucleus mass.
    pub top_p: f64,
    /// Base seed; a prompt samples with `seed + position`.
    pub seed: u64,
}

/// A generated response.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The whole response (a local template's response prefix included).
    pub response: String,
    /// Why it ended.
    pub finish_reason: String,
}

/// A source of answers.
pub enum Generator {
    /// A model on quill's engine thread.
    Local {
        /// The engine (boxed: its handle holds the tokenizer).
        engine: Box<EngineHandle>,
        /// Wraps each question.
        template: PromptTemplate,
        /// How to sample.
        sampling: Sampling,
    },
    /// An OpenAI-compatible endpoint.
    Remote {
        /// The endpoint (boxed: its HTTP client is large).
        endpoint: Box<Endpoint>,
        /// How to sample.
        sampling: Sampling,
    },
}

impl Generator {
    /// Loads a local model on its engine thread.
    pub fn local(
        model: ModelArgs,
        template: PromptTemplate,
        sampling: Sampling,
        batch_size: usize,
        in_flight: usize,
    ) -> anyhow::Result<Self> {
        let name = model.model.clone();
        let config = EngineConfig {
            max_batch: batch_size.max(1),
            // Every request in flight fits, so submitting never blocks a runtime thread.
            request_queue: in_flight + 2,
            ..EngineConfig::default()
        };
        let engine = EngineHandle::spawn(move || model.load_quill(), config)
            .with_context(|| format!("--model {name}: loading the model"))?;
        Ok(Generator::Local {
            engine: Box::new(engine),
            template,
            sampling,
        })
    }

    /// Generates one answer to `prompt`.
    pub async fn generate(&self, prompt: &Prompt) -> anyhow::Result<Generated> {
        match self {
            Generator::Local {
                engine,
                template,
                sampling,
            } => {
                let request = GenerationRequest {
                    id: prompt.position as u64,
                    prompt: engine
                        .tokenizer()
                        .encode(&template.render(&prompt.question))?,
                    n: 1,
                    params: SamplingParams {
                        temperature: sampling.temperature,
                        top_p: sampling.top_p,
                        top_k: 0,
                        max_new_tokens: sampling.max_new_tokens,
                        seed: sampling.seed.wrapping_add(prompt.position as u64),
                        stop_token_ids: engine.stop_token_ids(),
                        stop_strings: DEFAULT_STOP_STRINGS.iter().map(|s| s.to_string()).collect(),
                    },
                };
                let answer = engine.submit(request);
                let group = tokio::task::spawn_blocking(move || answer.recv())
                    .await?
                    .map_err(|_| anyhow!("the generation engine stopped unexpectedly"))?
                    .with_context(|| format!("generating for prompt {}", prompt.id))?;
                let sample = group
                    .samples
                    .into_iter()
                    .next()
                    .context("the engine returned no sample")?;
                Ok(Generated {
                    response: format!("{}{}", template.response_prefix, sample.text),
                    finish_reason: sample.finish.as_str().to_owned(),
                })
            }
            Generator::Remote { endpoint, sampling } => {
                let body = endpoint.body(
                    &prompt.question,
                    json!({
                        "max_tokens": sampling.max_new_tokens,
                        "temperature": sampling.temperature,
                        "top_p": sampling.top_p,
                        "seed": sampling.seed.wrapping_add(prompt.position as u64),
                    }),
                );
                let read = |reply: &Value| {
                    let text = reply_text(reply)?;
                    let finish = reply["choices"][0]["finish_reason"]
                        .as_str()
                        .unwrap_or("unknown")
                        .to_owned();
                    Ok((text, finish))
                };
                let (response, finish_reason) = endpoint.ask(&body, read).await?.map_err(|e| {
                    anyhow!("--endpoint: unreadable reply for prompt {}: {e}", prompt.id)
                })?;
                Ok(Generated {
                    response,
                    finish_reason,
                })
            }
        }
    }
}

/// The answer in a response: the text inside `<answer>…</answer>` (to the end when the
/// close tag is missing, as when `</answer>` stopped generation); else the text after
/// `</think>`; else the whole response. `<|endoftext|>` is dropped.
pub fn answer_of(response: &str) -> String {
    let body = if let Some(at) = response.find("<answer>") {
        let rest = &response[at + "<answer>".len()..];
        rest.split("</answer>").next().unwrap_or(rest)
    } else if let Some(at) = response.find("</think>") {
        &response[at + "</think>".len()..]
    } else {
        response
    };
    body.replace("<|endoftext|>", "").trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_taken_from_its_tags() {
        assert_eq!(
            answer_of("<think>plan</think>\n<answer> The text. </answer><|endoftext|>"),
            "The text."
        );
        assert_eq!(answer_of("<think>p</think><answer>cut short"), "cut short");
        assert_eq!(answer_of("<think>plan</think> after"), "after");
        assert_eq!(answer_of(" plain text<|endoftext|>"), "plain text");
    }
}

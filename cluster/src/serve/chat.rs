//! Turning a chat conversation into one prompt: the model's own chat template (the Jinja
//! text Hugging Face keeps in `tokenizer_config.json` or `chat_template.jinja`) when it has
//! one, else the job's completion template applied to the last user message.

use super::request::Message;
use anyhow::{bail, Context};
use minijinja::{Environment, ErrorKind};
use quill_config::template::{PromptTemplate, DEFAULT_STOP_STRINGS};
use serde_json::Value;
use std::path::Path;

/// How chat prompts are built.
pub enum ChatPrompt {
    /// A Jinja chat template with the special tokens it refers to.
    Jinja {
        /// The template's environment (it holds the one template, `chat`).
        env: Box<Environment<'static>>,
        /// `bos_token` as the template sees it.
        bos: String,
        /// `eos_token` as the template sees it.
        eos: String,
    },
    /// quill's completion template: the last user message is the question.
    Completion(PromptTemplate),
}

impl ChatPrompt {
    /// The chat template of a model folder (`chat_template.jinja`, else
    /// `tokenizer_config.json`'s `chat_template`), or `fallback` when it has none.
    pub fn for_model(dir: &Path, fallback: PromptTemplate) -> anyhow::Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", config_path.display()))?,
            Err(_) => Value::Null,
        };
        let jinja_path = dir.join("chat_template.jinja");
        let template = if jinja_path.is_file() {
            Some(
                std::fs::read_to_string(&jinja_path)
                    .with_context(|| format!("reading {}", jinja_path.display()))?,
            )
        } else {
            match &config["chat_template"] {
                Value::String(t) => Some(t.clone()),
                Value::Array(named) => named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_owned),
                _ => None,
            }
        };
        match template {
            Some(text) => Self::jinja(
                text,
                special_token(&config["bos_token"]),
                special_token(&config["eos_token"]),
            )
            .with_context(|| format!("the chat template of {}", dir.display())),
            None => Ok(ChatPrompt::Completion(fallback)),
        }
    }

    /// A Jinja chat template.
    pub fn jinja(text: String, bos: String, eos: String) -> anyhow::Result<Self> {
        let mut env = Environment::new();
        env.add_function("raise_exception", |message: String| -> Result<String, _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", text)
            .context("the chat template does not parse")?;
        Ok(ChatPrompt::Jinja {
            env: Box::new(env),
            bos,
            eos,
        })
    }

    /// The prompt for a conversation, ready for the assistant's next turn.
    pub fn render(&self, messages: &[Message]) -> anyhow::Result<String> {
        match self {
            ChatPrompt::Jinja { env, bos, eos } => env
                .get_template("chat")
                .expect("added at construction")
                .render(minijinja::context! {
                    messages => messages
                        .iter()
                        .map(|m| {
                            minijinja::Value::from_pairs([
                                ("role", m.role.as_str()),
                                ("content", m.content.as_str()),
                            ])
                        })
                        .collect::<minijinja::Value>(),
                    add_generation_prompt => true,
                    bos_token => bos,
                    eos_token => eos,
                })
                .map_err(|e| anyhow::anyhow!("the chat template failed: {e}")),
            ChatPrompt::Completion(template) => {
                let Some(last) = messages.iter().rev().find(|m| m.role == "user") else {
                    bail!("the conversation has no user message");
                };
                Ok(template.render(&last.content))
            }
        }
    }

    /// Stop strings every chat answer gets (the completion template's; none for Jinja,
    /// whose end-of-turn token is a stop token).
    pub fn stop_strings(&self) -> Vec<String> {
        match self {
            ChatPrompt::Jinja { .. } => Vec::new(),
            ChatPrompt::Completion(_) => DEFAULT_STOP_STRINGS.map(str::to_owned).to_vec(),
        }
    }
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn special_token(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Object(o) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_a_qwen_style_chat_template_from_a_model_folder() {
        let dir = tempfile::tempdir().unwrap();
        let template = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + \
            message.content + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}\
            {{- '<|im_start|>assistant\\n' }}{%- endif %}";
        let config =
            serde_json::json!({"chat_template": template, "eos_token": {"content": "<|im_end|>"}});
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let chat = ChatPrompt::for_model(dir.path(), PromptTemplate::default()).unwrap();
        let prompt = chat
            .render(&[msg("system", "Be brief."), msg("user", "Hi")])
            .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(chat.stop_strings().is_empty());
    }

    #[test]
    fn without_a_chat_template_the_last_user_message_fills_the_job_template() {
        let dir = tempfile::tempdir().unwrap();
        let chat = ChatPrompt::for_model(dir.path(), PromptTemplate::default()).unwrap();
        let prompt = chat
            .render(&[
                msg("user", "old"),
                msg("assistant", "x"),
                msg("user", "Write a poem."),
            ])
            .unwrap();
        assert_eq!(prompt, PromptTemplate::default().render("Write a poem."));
        assert!(chat.render(&[msg("system", "s")]).is_err());
        assert_eq!(chat.stop_strings().len(), DEFAULT_STOP_STRINGS.len());
    }

    #[test]
    fn a_template_that_raises_or_does_not_parse_is_an_error() {
        assert!(ChatPrompt::jinja("{% if %}".into(), String::new(), String::new()).is_err());
        let raising = ChatPrompt::jinja(
            "{{ raise_exception('only user turns') }}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let error = raising.render(&[msg("user", "x")]).unwrap_err().to_string();
        assert!(error.contains("only user turns"), "{error}");
    }
}

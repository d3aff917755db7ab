//! The think-then-answer completion template of the LongWriter-Zero recipe.

use serde::{Deserialize, Serialize};

/// Stop strings of the recipe: a new user turn, end of text, or the end of the answer.
pub const DEFAULT_STOP_STRINGS: [&str; 3] = ["<|user|>", "<|endoftext|>", "</answer>"];

/// The placeholder each template variant must contain exactly once.
pub const QUESTION_SLOT: &str = "{question}";

const ENGLISH: &str = "The user gives the assistant a writing task. The assistant first plans \
the piece inside <think> </think> tags, then writes the complete text inside <answer> \
</answer> tags, i.e. <think> plan here </think><answer> text here </answer>.\n\n\
<|user|>: {question} <|assistant|>:";

const CHINESE: &str = "用户给助手一个写作任务。助手先在 <think> </think> 标签内规划文章，\
然后在 <answer> </answer> 标签内写出完整的正文，即 <think> 规划 </think><answer> 正文 </answer>。\n\n\
<|user|>: {question} <|assistant|>:";

/// A plain completion prompt with an English and a Chinese variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptTemplate {
    /// Used for questions that are not mostly Chinese.
    pub english: String,
    /// Used for questions written mostly in Chinese.
    pub chinese: String,
    /// Text that ends every prompt and so begins every response (empty in the recipe). A
    /// reward worker reads a response as `response_prefix + generated text`; a job can use
    /// it to start the model inside the answer, e.g. `<think> </think><answer>`.
    #[serde(default)]
    pub response_prefix: String,
}

impl Default for PromptTemplate {
    fn default() -> Self {
        PromptTemplate {
            english: ENGLISH.to_owned(),
            chinese: CHINESE.to_owned(),
            response_prefix: String::new(),
        }
    }
}

/// A template variant that lacks the `{question}` slot or has it twice.
#[derive(Debug, thiserror::Error)]
#[error("template field `{field}` must contain {QUESTION_SLOT} exactly once (found {count})")]
pub struct TemplateError {
    /// `english` or `chinese`.
    pub field: &'static str,
    /// How often the slot occurs.
    pub count: usize,
}

impl PromptTemplate {
    /// Checks both variants.
    pub fn validate(&self) -> Result<(), TemplateError> {
        for (field, text) in [("english", &self.english), ("chinese", &self.chinese)] {
            let count = text.matches(QUESTION_SLOT).count();
            if count != 1 {
                return Err(TemplateError { field, count });
            }
        }
        Ok(())
    }

    /// The prompt for `question`, in the variant that matches its script.
    pub fn render(&self, question: &str) -> String {
        let template = if is_chinese(question) {
            &self.chinese
        } else {
            &self.english
        };
        let mut prompt = template.replacen(QUESTION_SLOT, question.trim(), 1);
        prompt.push_str(&self.response_prefix);
        prompt
    }
}

/// Whether a character is a CJK ideograph (the unified blocks and their extensions).
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x2FA1F)
}

/// A question is Chinese when its CJK characters outweigh its Latin letters (one CJK
/// character standing for about three letters).
pub fn is_chinese(text: &str) -> bool {
    let cjk = text.chars().filter(|&c| is_cjk(c)).count();
    let latin = text.chars().filter(char::is_ascii_alphabetic).count();
    cjk > 0 && cjk * 3 > latin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_variant_by_script() {
        let t = PromptTemplate::default();
        let en = t.render("Write a 500-word story about a lighthouse.");
        assert!(en.starts_with("The user gives"));
        assert!(en.ends_with("<|user|>: Write a 500-word story about a lighthouse. <|assistant|>:"));
        let zh = t.render("写一篇关于AI的文章，2000字");
        assert!(zh.starts_with("用户给助手"));
        assert!(zh.ends_with("<|user|>: 写一篇关于AI的文章，2000字 <|assistant|>:"));
    }

    #[test]
    fn the_response_prefix_ends_the_prompt() {
        let t = PromptTemplate {
            response_prefix: " <think> </think><answer>".into(),
            ..PromptTemplate::default()
        };
        assert!(t
            .render("Write 50 words.")
            .ends_with("<|assistant|>: <think> </think><answer>"));
    }

    #[test]
    fn script_detection() {
        assert!(is_chinese("请写一篇散文"));
        assert!(is_chinese("写一篇关于GPU的文章"));
        assert!(!is_chinese(
            "Write an essay about the poet 李白 and his travels"
        ));
        assert!(!is_chinese("Write 300 words."));
    }

    #[test]
    fn template_without_slot_is_rejected() {
        let t = PromptTemplate {
            english: "no slot".into(),
            ..PromptTemplate::default()
        };
        let err = t.validate().unwrap_err().to_string();
        assert!(
            err.contains("`english`") && err.contains("found 0"),
            "{err}"
        );
        let t = PromptTemplate {
            chinese: "{question}{question}".into(),
            ..PromptTemplate::default()
        };
        assert!(t.validate().unwrap_err().to_string().contains("`chinese`"));
    }
}

//! The think-then-answer completion template of the LongWriter-Zero recipe: an English and
//! a Chinese variant, the rule that picks between them, and loading a template from a
//! TOML file (so a user can drop in the released model's exact prompt).

use serde::{Deserialize, Serialize};
use std::path::Path;

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
<|用户|>: {question} <|助手|>:";

/// How a question is judged Chinese, which picks the template's Chinese variant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChineseRule {
    /// Any character in U+4E00–U+9FFF, as the released LongWriter-Zero model's card does.
    #[default]
    AnyCjk,
    /// CJK ideographs make up at least `chinese_share` of the question's CJK characters
    /// and Latin letters together.
    Share,
}

/// The default `chinese_share`: a quarter, so one CJK character weighs about three letters.
pub const DEFAULT_CHINESE_SHARE: f64 = 0.25;

/// A plain completion prompt with an English and a Chinese variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptTemplate {
    /// Used for questions that are not Chinese.
    pub english: String,
    /// Used for questions that [`PromptTemplate::chinese_rule`] judges Chinese.
    pub chinese: String,
    /// Text that ends every prompt and so begins every response (empty in the recipe). A
    /// reward worker reads a response as `response_prefix + generated text`; a job can use
    /// it to start the model inside the answer, e.g. `<think> </think><answer>`.
    pub response_prefix: String,
    /// Which rule picks the Chinese variant.
    pub chinese_rule: ChineseRule,
    /// The least share of CJK characters for [`ChineseRule::Share`], in (0, 1].
    pub chinese_share: f64,
    /// A TOML file holding the fields above; when set, the job loads the template from it
    /// (relative to the job file) and the other fields of the section are not used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

impl Default for PromptTemplate {
    fn default() -> Self {
        PromptTemplate {
            english: ENGLISH.to_owned(),
            chinese: CHINESE.to_owned(),
            response_prefix: String::new(),
            chinese_rule: ChineseRule::AnyCjk,
            chinese_share: DEFAULT_CHINESE_SHARE,
            file: None,
        }
    }
}

/// A template field with a bad value.
#[derive(Debug, thiserror::Error)]
#[error("template field `{field}` {reason}")]
pub struct TemplateError {
    /// `english`, `chinese`, `chinese_share` or `file`.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// A template file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TemplateFileError {
    /// The file could not be read.
    #[error("template file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Not valid TOML, or a field of the wrong type or name.
    #[error("template file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What the TOML parser said (it names the field and line).
        message: String,
    },
    /// A field with a bad value.
    #[error("template file {path}: {source}")]
    Invalid {
        /// The file.
        path: String,
        /// The field and the problem.
        source: TemplateError,
    },
}

impl PromptTemplate {
    /// Reads a template from a TOML file with the fields of a job's `[template]` section
    /// (`english` and `chinese` are required there, each with `{question}` once).
    pub fn from_file(path: &Path) -> Result<Self, TemplateFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TemplateFileError::Io {
            path: shown.clone(),
            source,
        })?;
        let parse_error = |message: String| TemplateFileError::Parse {
            path: shown.clone(),
            message: message.trim_end().to_owned(),
        };
        let table: toml::Table = toml::from_str(&text).map_err(|e| parse_error(e.to_string()))?;
        for field in ["english", "chinese"] {
            if !table.contains_key(field) {
                return Err(TemplateFileError::Invalid {
                    path: shown,
                    source: TemplateError {
                        field,
                        reason: format!("is missing (it must contain {QUESTION_SLOT} once)"),
                    },
                });
            }
        }
        if table.contains_key("file") {
            return Err(TemplateFileError::Invalid {
                path: shown,
                source: TemplateError {
                    field: "file",
                    reason: "cannot be set inside a template file".into(),
                },
            });
        }
        let template: PromptTemplate =
            toml::from_str(&text).map_err(|e| parse_error(e.to_string()))?;
        template
            .validate()
            .map_err(|source| TemplateFileError::Invalid {
                path: shown,
                source,
            })?;
        Ok(template)
    }

    /// Checks both variants and the share.
    pub fn validate(&self) -> Result<(), TemplateError> {
        for (field, text) in [("english", &self.english), ("chinese", &self.chinese)] {
            let count = text.matches(QUESTION_SLOT).count();
            if count != 1 {
                return Err(TemplateError {
                    field,
                    reason: format!("must contain {QUESTION_SLOT} exactly once (found {count})"),
                });
            }
        }
        if !(self.chinese_share > 0.0 && self.chinese_share <= 1.0) {
            return Err(TemplateError {
                field: "chinese_share",
                reason: format!("must be in (0, 1], got {}", self.chinese_share),
            });
        }
        Ok(())
    }

    /// Whether `question` gets the Chinese variant under this template's rule.
    pub fn is_chinese(&self, question: &str) -> bool {
        match self.chinese_rule {
            ChineseRule::AnyCjk => has_cjk(question),
            ChineseRule::Share => cjk_share(question) >= self.chinese_share,
        }
    }

    /// The prompt for `question`, in the variant its script calls for.
    pub fn render(&self, question: &str) -> String {
        let template = if self.is_chinese(question) {
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

/// Whether `text` holds a character of the basic CJK block U+4E00–U+9FFF (the released
/// model card's test, `[\u4e00-\u9fff]`).
pub fn has_cjk(text: &str) -> bool {
    text.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c))
}

/// The share of CJK ideographs among the CJK characters and Latin letters of `text` (0
/// when it has neither).
pub fn cjk_share(text: &str) -> f64 {
    let cjk = text.chars().filter(|&c| is_cjk(c)).count();
    let latin = text.chars().filter(char::is_ascii_alphabetic).count();
    if cjk + latin == 0 {
        0.0
    } else {
        cjk as f64 / (cjk + latin) as f64
    }
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
        assert!(zh.ends_with("<|用户|>: 写一篇关于AI的文章，2000字 <|助手|>:"));
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
    fn any_cjk_character_makes_a_question_chinese_by_default() {
        let t = PromptTemplate::default();
        assert!(t.is_chinese("请写一篇散文"));
        assert!(t.is_chinese("Write an essay about the poet 李白 and his travels"));
        assert!(!t.is_chinese("Write 300 words."));
        // Outside U+4E00–U+9FFF, as the card's regex: an extension-A ideograph alone.
        assert!(!t.is_chinese("Write about \u{3400}"));
    }

    #[test]
    fn the_share_rule_weighs_cjk_against_latin_letters() {
        let t = PromptTemplate {
            chinese_rule: ChineseRule::Share,
            ..PromptTemplate::default()
        };
        assert!(t.is_chinese("请写一篇散文"));
        assert!(t.is_chinese("写一篇关于GPU的文章"));
        assert!(!t.is_chinese("Write an essay about the poet 李白 and his travels"));
        assert!(!t.is_chinese("Write 300 words."));
        assert_eq!(cjk_share("ab写文"), 0.5);
        let strict = PromptTemplate {
            chinese_share: 0.9,
            ..t
        };
        assert!(!strict.is_chinese("写一篇关于GPU的文章"));
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
        let t = PromptTemplate {
            chinese_share: 0.0,
            ..PromptTemplate::default()
        };
        assert!(t
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`chinese_share`"));
    }

    fn from_text(text: &str) -> Result<PromptTemplate, TemplateFileError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prompt.toml");
        std::fs::write(&path, text).unwrap();
        PromptTemplate::from_file(&path)
    }

    #[test]
    fn a_template_file_gives_the_exact_prompt() {
        let t = from_text(concat!(
            "english = 'A conversation. <|user|>: {question} <|assistant|>:'\n",
            "chinese = '对话。<|用户|>: {question} <|助手|>:'\n",
        ))
        .unwrap();
        assert_eq!(
            t.render("Write 500 words."),
            "A conversation. <|user|>: Write 500 words. <|assistant|>:"
        );
        assert_eq!(t.render("写五百字"), "对话。<|用户|>: 写五百字 <|助手|>:");
        assert_eq!(t.chinese_rule, ChineseRule::AnyCjk);
        let share = from_text(concat!(
            "english = '{question}'\nchinese = 'zh {question}'\n",
            "chinese_rule = 'share'\nchinese_share = 0.5\nresponse_prefix = '<think>'\n",
        ))
        .unwrap();
        assert_eq!(share.render("ab写"), "ab写<think>");
        assert_eq!(share.render("a写"), "zh a写<think>");
    }

    #[test]
    fn bad_template_files_name_the_field() {
        let err = |text: &str| from_text(text).unwrap_err().to_string();
        let e = err("english = '{question}'\n");
        assert!(e.contains("`chinese` is missing"), "{e}");
        let e = err("english = 'no slot'\nchinese = '{question}'\n");
        assert!(
            e.contains("`english` must contain {question} exactly once (found 0)"),
            "{e}"
        );
        let e = err("english = '{question}'\nchinese = '{question}'\nchinese_rule = 'most'\n");
        assert!(e.contains("chinese_rule") && e.contains("line 3"), "{e}");
        let e = err("english = '{question}'\nchinese = '{question}'\nenglsh = 'x'\n");
        assert!(e.contains("englsh"), "{e}");
        let e = err("english = '{question}'\nchinese = '{question}'\nfile = 'x.toml'\n");
        assert!(e.contains("`file` cannot be set"), "{e}");
        let e = err("english = \n");
        assert!(
            e.starts_with("template file ") && e.contains("line 1"),
            "{e}"
        );
        let missing = PromptTemplate::from_file(Path::new("/no/such/prompt.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with("template file /no/such/prompt.toml"),
            "{missing}"
        );
    }
}

//! The format reward: the template's structure, and no padding by repetition.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::text::{count_words, is_digit_separator, split_response, words};
use crate::RewardError;

/// Paragraphs and sentences with fewer words than this (headings, separators, "Why?")
/// are never counted as repetitions, nor in the shares' denominators.
const MIN_WORDS: usize = 3;

/// The n of the repeated n-grams.
const NGRAM: usize = 4;

/// Characters that end a sentence (besides the end of a line).
const SENTENCE_ENDS: [char; 6] = ['.', '!', '?', '。', '！', '？'];

/// How much of an answer repeats itself.
///
/// Paragraphs are runs of lines between blank lines; sentences are split at `.`, `!`,
/// `?`, `。`, `！`, `？` (not at a `.` between digits) and at line ends. Two paragraphs or
/// sentences are the same when their [`words`] are, ignoring case, so
/// whitespace and punctuation do not tell them apart. Paragraphs and sentences of fewer
/// than 3 words are left out of both counts.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RepetitionStats {
    /// The share of paragraphs that repeat an earlier paragraph.
    pub repeated_paragraph_share: f64,
    /// The share of sentences that repeat an earlier sentence.
    pub repeated_sentence_share: f64,
    /// The share of word 4-grams (a CJK character is a word) that are occurrences of a
    /// 4-gram beyond its first: (all 4-grams − distinct 4-grams) / all 4-grams.
    pub repeated_ngram_share: f64,
}

impl RepetitionStats {
    /// The statistics of `answer`; all zero for an answer with nothing to repeat.
    pub fn of(answer: &str) -> Self {
        let scan = Scan::of(answer);
        let tokens: Vec<String> = words(answer).map(str::to_lowercase).collect();
        let repeated_ngram_share = match tokens.len().checked_sub(NGRAM - 1) {
            Some(total) if total > 0 => {
                let distinct: HashSet<&[String]> = tokens.windows(NGRAM).collect();
                (total - distinct.len()) as f64 / total as f64
            }
            _ => 0.0,
        };
        RepetitionStats {
            repeated_paragraph_share: scan.paragraphs.share(),
            repeated_sentence_share: scan.sentences.share(),
            repeated_ngram_share,
        }
    }
}

/// The word count of `answer` without its repeated paragraphs and repeated sentences
/// (as [`RepetitionStats`] defines them): what the length reward counts, so that padding
/// by repetition earns no length. Equals [`count_words`] for an answer that does not
/// repeat itself.
pub fn effective_word_count(answer: &str) -> usize {
    Scan::of(answer).effective_words
}

/// The format reward's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FormatConfig {
    /// The share of repeated 4-grams that goes unpenalised, as natural text repeats some
    /// phrases; in `[0, 1]`, default 0.2.
    pub max_ngram_share: f64,
    /// The penalty per unit of repeated paragraph share; at least 0, default 2.
    pub paragraph_penalty: f64,
    /// The penalty per unit of repeated sentence share; at least 0, default 2.
    pub sentence_penalty: f64,
    /// The penalty per unit of repeated 4-gram share above `max_ngram_share`; at least 0,
    /// default 2.
    pub ngram_penalty: f64,
}

impl Default for FormatConfig {
    fn default() -> Self {
        FormatConfig {
            max_ngram_share: 0.2,
            paragraph_penalty: 2.0,
            sentence_penalty: 2.0,
            ngram_penalty: 2.0,
        }
    }
}

impl FormatConfig {
    /// Checks that every field is finite and in its domain.
    pub fn validate(&self) -> Result<(), RewardError> {
        let share = self.max_ngram_share;
        if !(0.0..=1.0).contains(&share) {
            return Err(RewardError::InvalidFormatConfig {
                field: "max_ngram_share",
                value: share,
                problem: "it must be a share between 0 and 1",
            });
        }
        for (field, value) in [
            ("paragraph_penalty", self.paragraph_penalty),
            ("sentence_penalty", self.sentence_penalty),
            ("ngram_penalty", self.ngram_penalty),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(RewardError::InvalidFormatConfig {
                    field,
                    value,
                    problem: "it must be a finite number of at least 0",
                });
            }
        }
        Ok(())
    }
}

/// The format reward of `response`, in `[−1, 1]`:
///
/// - `−1` when the response is not well formed (see [`split_response`]) or its answer
///   has no words;
/// - otherwise, with the answer's [`RepetitionStats`] `p`, `s`, `n`,
///   `1 − paragraph_penalty·p − sentence_penalty·s − ngram_penalty·max(0, n −
///   max_ngram_share)`, clipped to `[−1, 1]`: 1 for an answer that does not repeat
///   itself, and −1 already at a third of its paragraphs repeated with the defaults.
///
/// `config` should have passed [`FormatConfig::validate`].
pub fn format_reward(response: &str, config: &FormatConfig) -> f64 {
    let parsed = split_response(response);
    let answer = match parsed.answer {
        Some(answer) if parsed.well_formed && count_words(answer) > 0 => answer,
        _ => return -1.0,
    };
    let stats = RepetitionStats::of(answer);
    let excess_ngrams = (stats.repeated_ngram_share - config.max_ngram_share).max(0.0);
    let penalty = config.paragraph_penalty * stats.repeated_paragraph_share
        + config.sentence_penalty * stats.repeated_sentence_share
        + config.ngram_penalty * excess_ngrams;
    (1.0 - penalty).clamp(-1.0, 1.0)
}

/// Pieces of text seen so far, by their comparison keys.
#[derive(Default)]
struct Repeats {
    seen: HashSet<String>,
    counted: usize,
    repeated: usize,
}

impl Repeats {
    /// Records a piece with comparison key `key` and `n` words; whether it repeats an
    /// earlier one. Pieces under [`MIN_WORDS`] are not recorded and never repeat.
    fn is_repeat(&mut self, key: String, n: usize) -> bool {
        if n < MIN_WORDS {
            return false;
        }
        self.counted += 1;
        let repeat = !self.seen.insert(key);
        self.repeated += usize::from(repeat);
        repeat
    }

    /// The share of recorded pieces that repeat an earlier one; 0 when none was recorded.
    fn share(&self) -> f64 {
        if self.counted == 0 {
            0.0
        } else {
            self.repeated as f64 / self.counted as f64
        }
    }
}

/// One pass over an answer's paragraphs and sentences.
struct Scan {
    paragraphs: Repeats,
    sentences: Repeats,
    /// Words outside repeated paragraphs and repeated sentences.
    effective_words: usize,
}

impl Scan {
    fn of(answer: &str) -> Scan {
        let mut scan = Scan {
            paragraphs: Repeats::default(),
            sentences: Repeats::default(),
            effective_words: 0,
        };
        for paragraph in paragraphs(answer) {
            let (key, n) = comparison_key(&paragraph);
            let paragraph_repeats = scan.paragraphs.is_repeat(key, n);
            for sentence in paragraph.iter().flat_map(|line| sentences(line)) {
                let (key, n) = comparison_key(&[sentence]);
                if !scan.sentences.is_repeat(key, n) && !paragraph_repeats {
                    scan.effective_words += n;
                }
            }
        }
        scan
    }
}

/// The paragraphs of `text`: runs of lines that are not blank.
fn paragraphs(text: &str) -> Vec<Vec<&str>> {
    let mut paragraphs = vec![];
    let mut current = vec![];
    for line in text.lines() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                paragraphs.push(std::mem::take(&mut current));
            }
        } else {
            current.push(line);
        }
    }
    if !current.is_empty() {
        paragraphs.push(current);
    }
    paragraphs
}

/// The sentences of one line, split at sentence-ending punctuation (not at a `.`
/// between digits); some may be empty.
fn sentences(line: &str) -> Vec<&str> {
    let mut sentences = vec![];
    let mut start = 0;
    let mut prev = None;
    let mut chars = line.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let next = chars.peek().map(|&(_, next)| next);
        let in_number = matches!((prev, next), (Some(p), Some(n)) if is_digit_separator(p, c, n));
        if SENTENCE_ENDS.contains(&c) && !in_number {
            sentences.push(&line[start..i]);
            start = i + c.len_utf8();
        }
        prev = Some(c);
    }
    sentences.push(&line[start..]);
    sentences
}

/// The comparison key of a piece of text made of `parts`: its words, lowercased, joined
/// by single spaces; and how many words it has.
fn comparison_key(parts: &[&str]) -> (String, usize) {
    let mut key = String::new();
    let mut n = 0;
    for word in parts.iter().flat_map(|part| words(part)) {
        if n > 0 {
            key.push(' ');
        }
        key.extend(word.chars().flat_map(char::to_lowercase));
        n += 1;
    }
    (key, n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::length::{length_reward, response_length_reward, LengthRange};

    /// A response in the template around `answer`.
    fn respond(answer: &str) -> String {
        format!("<think>Plan the piece.</think>\n<answer>{answer}</answer>")
    }

    /// Paragraph `p` of a synthetic essay: four sentences, no 4-gram of which occurs
    /// anywhere else in any essay paragraph.
    fn paragraph(p: usize) -> String {
        (0..4)
            .map(|s| {
                let id = p * 10 + s;
                format!(
                    "Note {id} shows {} facts about {} rivers.",
                    id * 7 + 1,
                    id * 7 + 2
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn essay(paragraphs: std::ops::Range<usize>) -> Vec<String> {
        paragraphs.map(paragraph).collect()
    }

    #[test]
    fn an_answer_without_repetition_scores_one() {
        let answer = essay(0..6).join("\n\n");
        assert_eq!(count_words(&answer), 6 * 4 * 8);
        assert_eq!(RepetitionStats::of(&answer), RepetitionStats::default());
        assert_eq!(effective_word_count(&answer), count_words(&answer));
        assert_eq!(
            format_reward(&respond(&answer), &FormatConfig::default()),
            1.0
        );
    }

    #[test]
    fn counts_repeated_paragraphs_and_sentences_ignoring_case_and_short_ones() {
        let answer = "Alpha beta gamma delta.\nOne two three four. Alpha beta gamma delta!\n\n\
                      Short.\n\n  ALPHA  beta, Gamma delta.\nOne two three four. Alpha beta gamma delta\n\n\
                      Why? Why?";
        let stats = RepetitionStats::of(answer);
        // Paragraphs 1 and 3 count, 3 repeats 1; "Short." and "Why? Why?" are too short.
        assert_eq!(stats.repeated_paragraph_share, 0.5);
        // Six sentences of 4 words count; four of them repeat an earlier one.
        assert_eq!(stats.repeated_sentence_share, 4.0 / 6.0);
        // 27 words, 24 4-grams, 14 distinct ones.
        assert_eq!(count_words(answer), 27);
        assert_eq!(stats.repeated_ngram_share, 10.0 / 24.0);
        // Paragraph 1 less its repeated sentence, "Short", and both "Why".
        assert_eq!(effective_word_count(answer), 8 + 1 + 2);
    }

    #[test]
    fn chinese_repetition_is_found() {
        let p1 = "春天来了，山坡上开满了野花。孩子们在田野里奔跑，笑声传得很远。";
        let p2 = "夏天的夜晚很安静，萤火虫在池塘边飞舞。老人坐在门口讲述过去的故事。";
        let p3 = "秋风吹过稻田，金黄的稻穗低下了头。农民脸上露出丰收的喜悦。";
        let clean = [p1, p2, p3].join("\n\n");
        assert_eq!(RepetitionStats::of(&clean), RepetitionStats::default());
        let padded = [p1, p2, p3, p1].join("\n\n");
        let stats = RepetitionStats::of(&padded);
        assert_eq!(stats.repeated_paragraph_share, 0.25);
        assert_eq!(stats.repeated_sentence_share, 0.25);
        assert!(stats.repeated_ngram_share > 0.2, "{stats:?}");
        assert_eq!(effective_word_count(&padded), count_words(&clean));
        assert_eq!(count_words(&padded), count_words(&clean) + count_words(p1));
    }

    #[test]
    fn numbers_do_not_split_sentences() {
        assert_eq!(
            sentences("Pi is 3.14 today. Yes"),
            ["Pi is 3.14 today", " Yes"]
        );
        assert_eq!(sentences("好。对！"), ["好", "对", ""]);
    }

    #[test]
    fn padding_by_repeated_paragraphs_earns_neither_length_nor_format() {
        let base = essay(0..10).join("\n\n");
        let words = count_words(&base);
        assert_eq!(words, 320);
        let range = LengthRange::new(900, 1000).unwrap();
        // Three copies reach the range by raw count …
        let padded = [base.as_str(); 3].join("\n\n");
        assert_eq!(count_words(&padded), 960);
        assert_eq!(length_reward(count_words(&padded), range, 3000), 1.0);
        // … but the length reward counts only the first copy.
        assert_eq!(effective_word_count(&padded), 320);
        let base_length = response_length_reward(&respond(&base), range, 3000);
        assert_eq!(base_length, 320.0 / 900.0);
        assert_eq!(
            response_length_reward(&respond(&padded), range, 3000),
            base_length
        );
        let config = FormatConfig::default();
        assert_eq!(format_reward(&respond(&base), &config), 1.0);
        assert_eq!(format_reward(&respond(&padded), &config), -1.0);
    }

    #[test]
    fn reshuffled_sentences_count_once() {
        let sentences: Vec<String> = essay(0..2)
            .iter()
            .flat_map(|p| {
                p.split_inclusive(". ")
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        let base = sentences.concat();
        let reshuffled: String = sentences.iter().rev().cloned().collect();
        let padded = format!("{base}\n\n{reshuffled}");
        let stats = RepetitionStats::of(&padded);
        assert_eq!(stats.repeated_paragraph_share, 0.0);
        assert_eq!(stats.repeated_sentence_share, 0.5);
        assert_eq!(effective_word_count(&padded), count_words(&base));
        assert!(format_reward(&respond(&padded), &FormatConfig::default()) < 0.0);
    }

    #[test]
    fn one_repeated_paragraph_costs_in_proportion() {
        let mut paragraphs = essay(0..5);
        paragraphs.push(paragraphs[0].clone());
        let answer = paragraphs.join("\n\n");
        let stats = RepetitionStats::of(&answer);
        assert_eq!(stats.repeated_paragraph_share, 1.0 / 6.0);
        assert_eq!(stats.repeated_sentence_share, 4.0 / 24.0);
        // 192 words, 189 4-grams; the copy repeats the 29 inside it.
        assert_eq!(stats.repeated_ngram_share, 29.0 / 189.0);
        let reward = format_reward(&respond(&answer), &FormatConfig::default());
        assert!(
            (reward - (1.0 - 2.0 / 6.0 - 2.0 / 6.0)).abs() < 1e-12,
            "{reward}"
        );
    }

    #[test]
    fn repeated_phrases_beyond_the_threshold_cost() {
        let answer: String = (0..10)
            .map(|i| format!("As I said before the number {i} matters. "))
            .collect();
        let stats = RepetitionStats::of(&answer);
        assert_eq!(stats.repeated_paragraph_share, 0.0);
        assert_eq!(stats.repeated_sentence_share, 0.0);
        assert_eq!(stats.repeated_ngram_share, 35.0 / 77.0);
        let reward = format_reward(&respond(&answer), &FormatConfig::default());
        assert!(
            (reward - (1.0 - 2.0 * (35.0 / 77.0 - 0.2))).abs() < 1e-12,
            "{reward}"
        );
        let lenient = FormatConfig {
            max_ngram_share: 0.5,
            ..FormatConfig::default()
        };
        assert_eq!(format_reward(&respond(&answer), &lenient), 1.0);
    }

    #[test]
    fn ill_formed_or_empty_responses_get_minus_one() {
        let config = FormatConfig::default();
        let text = paragraph(0);
        for response in [
            format!("<think>a</think><think>b</think><answer>{text}</answer>"),
            format!("<think>a</think><answer>{text}"),
            format!("Sure. <think>a</think><answer>{text}</answer>"),
            format!("<think>a</think><answer>{text}</answer> and more"),
            format!("<answer>{text}</answer>"),
            "<think>a</think><answer> \n </answer>".to_owned(),
            "<think>a</think><answer>... !!</answer>".to_owned(),
            String::new(),
        ] {
            assert_eq!(format_reward(&response, &config), -1.0, "{response}");
        }
        assert_eq!(format_reward(&respond(&text), &config), 1.0);
    }

    #[test]
    fn validates_the_config_naming_the_field() {
        assert_eq!(FormatConfig::default().validate(), Ok(()));
        let bad = FormatConfig {
            max_ngram_share: 1.5,
            ..FormatConfig::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(
            err.starts_with("format config field `max_ngram_share` is 1.5"),
            "{err}"
        );
        let bad = FormatConfig {
            max_ngram_share: f64::NAN,
            ..FormatConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = FormatConfig {
            sentence_penalty: -1.0,
            ..FormatConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`sentence_penalty`"));
        let bad = FormatConfig {
            ngram_penalty: f64::INFINITY,
            ..FormatConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`ngram_penalty`"));
    }
}

//! Words of a text and the think/answer structure of a response.

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const ANSWER_OPEN: &str = "<answer>";
const ANSWER_CLOSE: &str = "</answer>";
const END_OF_TEXT: &str = "<|endoftext|>";

/// Whether `c` is a CJK ideograph (U+3400–4DBF, U+4E00–9FFF, U+F900–FAFF,
/// U+20000–2FA1F); each one counts as a word.
pub(crate) fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x2FA1F)
}

/// A letter or digit that is not a CJK ideograph: the stuff of space-separated words.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() && !is_cjk(c)
}

/// Whether `c` between `prev` and `next` (both word characters) joins them into one
/// word: an apostrophe or hyphen between any word characters, a `.` or `,` between two
/// ASCII digits.
fn joins(prev: char, c: char, next: char) -> bool {
    match c {
        '\'' | '\u{2019}' | '-' | '\u{2010}' | '\u{2011}' => true,
        _ => is_digit_separator(prev, c, next),
    }
}

/// A `.` or `,` between two ASCII digits (`2,000`, `3.14`): part of a number, neither a
/// word break nor a sentence end.
pub(crate) fn is_digit_separator(prev: char, c: char, next: char) -> bool {
    matches!(c, '.' | ',') && prev.is_ascii_digit() && next.is_ascii_digit()
}

/// The words of a text, in order: see [`words`].
#[derive(Debug, Clone)]
pub struct Words<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Words<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let text = self.rest;
        let mut chars = text.char_indices();
        let (start, first) = loop {
            let Some((i, c)) = chars.next() else {
                self.rest = "";
                return None;
            };
            if is_cjk(c) {
                let end = i + c.len_utf8();
                self.rest = &text[end..];
                return Some(&text[i..end]);
            }
            if is_word_char(c) {
                break (i, c);
            }
        };
        let mut end = start + first.len_utf8();
        let mut prev = first;
        loop {
            let mut ahead = text[end..].chars();
            let Some(c) = ahead.next() else { break };
            if is_word_char(c) {
                end += c.len_utf8();
                prev = c;
                continue;
            }
            match ahead.next() {
                Some(next) if is_word_char(next) && joins(prev, c, next) => {
                    end += c.len_utf8() + next.len_utf8();
                    prev = next;
                }
                _ => break,
            }
        }
        self.rest = &text[end..];
        Some(&text[start..end])
    }
}

/// The words of `text`: each CJK ideograph on its own, and each maximal run of other
/// letters and digits (Latin, accented, Greek, Cyrillic …), where an apostrophe or
/// hyphen between two such characters (`don't`, `well-known`) and a `.` or `,` between
/// two digits (`2,000`, `3.14`) stay inside the word. Everything else separates words.
pub fn words(text: &str) -> Words<'_> {
    Words { rest: text }
}

/// How many words `text` has, as [`words`] splits it: English words plus CJK characters.
pub fn count_words(text: &str) -> usize {
    words(text).count()
}

/// A response split into its think and answer blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// The text between the first `<think>` and the first `</think>` after it; `None`
    /// when either tag is missing.
    pub think: Option<&'a str>,
    /// The text between the first `<answer>` after the think block (after the start of
    /// the response when there is no complete think block) and the first `</answer>`
    /// after it; `None` when either tag is missing, e.g. in a truncated response.
    pub answer: Option<&'a str>,
    /// Whether the response follows the template exactly: see [`split_response`].
    pub well_formed: bool,
}

/// Where a tagged block lies in a text, as byte offsets.
#[derive(Clone, Copy)]
struct Block {
    /// Where its opening tag starts.
    open: usize,
    /// Where its content starts and ends.
    content: (usize, usize),
    /// Just past its closing tag.
    end: usize,
}

/// The block from the first `open` at or after `from` to the first `close` after it.
fn block(text: &str, from: usize, open: &str, close: &str) -> Option<Block> {
    let open_at = text.get(from..)?.find(open)? + from;
    let start = open_at + open.len();
    let stop = text[start..].find(close)? + start;
    Some(Block {
        open: open_at,
        content: (start, stop),
        end: stop + close.len(),
    })
}

/// Splits `response`, the text the model generated after the prompt, into its blocks.
///
/// The response is well formed when it is, in order: optional whitespace, one
/// `<think>…</think>` block, optional whitespace, one `<answer>…</answer>` block, and
/// optional whitespace, optionally with one `<|endoftext|>` in it. Each of the four tags
/// must occur exactly once in the whole response, so a second think block, a tag
/// inside a block, a missing `</answer>` (a truncated response) or any text outside the
/// blocks makes it ill formed. The blocks' contents are not checked; they may be empty.
pub fn split_response(response: &str) -> Parsed<'_> {
    let think = block(response, 0, THINK_OPEN, THINK_CLOSE);
    let answer = block(
        response,
        think.map_or(0, |b| b.end),
        ANSWER_OPEN,
        ANSWER_CLOSE,
    );
    let once = [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE]
        .iter()
        .all(|tag| response.matches(tag).count() == 1);
    let well_formed = match (think, answer) {
        (Some(think), Some(answer)) if once => {
            let after = response[answer.end..].trim();
            response[..think.open].trim().is_empty()
                && response[think.end..answer.open].trim().is_empty()
                && (after.is_empty() || after == END_OF_TEXT)
        }
        _ => false,
    };
    let content = |b: Block| &response[b.content.0..b.content.1];
    Parsed {
        think: think.map(content),
        answer: answer.map(content),
        well_formed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_english_words_with_inner_apostrophes_hyphens_and_numbers() {
        assert_eq!(count_words(""), 0);
        assert_eq!(count_words("  \n\t-- ... !! "), 0);
        assert_eq!(count_words("Hello, world!"), 2);
        assert_eq!(count_words("Don't stop: a well-known fact."), 5);
        assert_eq!(count_words("It’s 2,000 words, i.e. 3.14 pages."), 7);
        assert_eq!(count_words("'quoted' -dash- end-"), 3);
        assert_eq!(count_words("Café naïve résumé Москва"), 4);
        assert_eq!(
            words("He said: 'twenty-one' x2.").collect::<Vec<_>>(),
            ["He", "said", "twenty-one", "x2"]
        );
    }

    #[test]
    fn counts_each_cjk_ideograph_as_a_word() {
        assert_eq!(count_words("春眠不觉晓，处处闻啼鸟。"), 10);
        assert_eq!(count_words("我用GPT-4写了3篇文章"), 9);
        assert_eq!(
            words("AI模型很强").collect::<Vec<_>>(),
            ["AI", "模", "型", "很", "强"]
        );
        // Extension B (U+20000) and compatibility (U+F900) ideographs count too;
        // CJK punctuation does not.
        assert_eq!(count_words("\u{20000}\u{F900}、。「」"), 2);
    }

    #[test]
    fn a_template_response_is_well_formed() {
        let parsed = split_response(" \n<think>plan it</think>\n\n<answer>The text.</answer>\n");
        assert_eq!(
            parsed,
            Parsed {
                think: Some("plan it"),
                answer: Some("The text."),
                well_formed: true
            }
        );
        let parsed = split_response("<think></think><answer>x</answer><|endoftext|>");
        assert_eq!(parsed.think, Some(""));
        assert_eq!(parsed.answer, Some("x"));
        assert!(parsed.well_formed);
        assert!(split_response("<think>a</think><answer>b</answer> \n<|endoftext|>\n").well_formed);
    }

    #[test]
    fn a_missing_closing_answer_tag_leaves_no_answer() {
        let parsed = split_response("<think>plan</think><answer>The text was cut off");
        assert_eq!(parsed.think, Some("plan"));
        assert_eq!(parsed.answer, None);
        assert!(!parsed.well_formed);
    }

    #[test]
    fn text_outside_the_blocks_is_ill_formed() {
        let before = split_response("Sure! <think>p</think><answer>a</answer>");
        assert_eq!(before.answer, Some("a"));
        assert!(!before.well_formed);
        assert!(!split_response("<think>p</think> so: <answer>a</answer>").well_formed);
        assert!(!split_response("<think>p</think><answer>a</answer> more").well_formed);
        assert!(!split_response("<think>p</think><answer>a</answer><|endoftext|>x").well_formed);
        assert!(
            !split_response("<think>p</think><answer>a</answer><|endoftext|><|endoftext|>")
                .well_formed
        );
    }

    #[test]
    fn repeated_missing_or_misordered_tags_are_ill_formed() {
        let twice = split_response("<think>a</think><think>b</think><answer>c</answer>");
        assert_eq!(twice.think, Some("a"));
        assert!(!twice.well_formed);
        assert!(
            !split_response("<think>a</think><answer>b</answer><answer>c</answer>").well_formed
        );
        assert!(!split_response("<answer>b</answer><think>a</think>").well_formed);
        assert!(!split_response("<answer>only an answer</answer>").well_formed);
        assert!(
            !split_response("<think>a <answer>x</answer></think><answer>b</answer>").well_formed
        );
        let unclosed_think = split_response("<think>a<answer>b</answer>");
        assert_eq!(unclosed_think.think, None);
        assert_eq!(unclosed_think.answer, Some("b"));
        assert!(!unclosed_think.well_formed);
        assert_eq!(
            split_response(""),
            Parsed {
                think: None,
                answer: None,
                well_formed: false
            }
        );
    }
}

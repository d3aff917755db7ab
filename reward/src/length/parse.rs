//! The target word range a question states ("between 800 and 1,200 words", "不超过2000字"):
//! numbers, units and the qualifiers around them.

use crate::text::is_cjk;

use super::zh_numerals::fold_chinese_numerals;
use super::LengthRange;

/// How a stated word count bounds the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    /// About that many: ±10%.
    About,
    /// At most that many: −10%.
    AtMost,
    /// At least that many: +10%.
    AtLeast,
}

impl Bound {
    /// The bound a negation turns this one into ("not more than" is "at most").
    fn negated(self) -> Bound {
        match self {
            Bound::About => Bound::About,
            Bound::AtMost => Bound::AtLeast,
            Bound::AtLeast => Bound::AtMost,
        }
    }
}

/// English phrases before a number that bound it, and cannot be negated.
const EN_FIXED: &[(&[&str], Bound)] = &[
    (&["at", "most"], Bound::AtMost),
    (&["up", "to"], Bound::AtMost),
    (&["within"], Bound::AtMost),
    (&["maximum"], Bound::AtMost),
    (&["maximum", "of"], Bound::AtMost),
    (&["max"], Bound::AtMost),
    (&["at", "least"], Bound::AtLeast),
    (&["minimum"], Bound::AtLeast),
    (&["minimum", "of"], Bound::AtLeast),
    (&["min"], Bound::AtLeast),
    (&["upwards", "of"], Bound::AtLeast),
    (&["in", "excess", "of"], Bound::AtLeast),
];

/// English comparatives before a number; a negation up to two words before them
/// ("no more than", "must not be longer than", "should not exceed") reverses them.
const EN_COMPARATIVES: &[(&[&str], Bound)] = &[
    (&["more", "than"], Bound::AtLeast),
    (&["longer", "than"], Bound::AtLeast),
    (&["over"], Bound::AtLeast),
    (&["above"], Bound::AtLeast),
    (&["exceed"], Bound::AtLeast),
    (&["exceeds"], Bound::AtLeast),
    (&["exceeding"], Bound::AtLeast),
    (&["less", "than"], Bound::AtMost),
    (&["fewer", "than"], Bound::AtMost),
    (&["shorter", "than"], Bound::AtMost),
    (&["under"], Bound::AtMost),
    (&["below"], Bound::AtMost),
];

/// English phrases right after the unit ("2,000 words or less").
const EN_SUFFIXES: &[(&[&str], Bound)] = &[
    (&["or", "less"], Bound::AtMost),
    (&["or", "fewer"], Bound::AtMost),
    (&["or", "under"], Bound::AtMost),
    (&["or", "below"], Bound::AtMost),
    (&["or", "shorter"], Bound::AtMost),
    (&["and", "under"], Bound::AtMost),
    (&["at", "most"], Bound::AtMost),
    (&["at", "the", "most"], Bound::AtMost),
    (&["maximum"], Bound::AtMost),
    (&["max"], Bound::AtMost),
    (&["tops"], Bound::AtMost),
    (&["or", "more"], Bound::AtLeast),
    (&["or", "longer"], Bound::AtLeast),
    (&["or", "above"], Bound::AtLeast),
    (&["or", "over"], Bound::AtLeast),
    (&["and", "above"], Bound::AtLeast),
    (&["and", "over"], Bound::AtLeast),
    (&["and", "up"], Bound::AtLeast),
    (&["at", "least"], Bound::AtLeast),
    (&["minimum"], Bound::AtLeast),
    (&["min"], Bound::AtLeast),
    (&["plus"], Bound::AtLeast),
];

/// Chinese phrases before a number that bound it, and cannot be negated.
const ZH_FIXED: &[(&str, Bound)] = &[
    ("至少", Bound::AtLeast),
    ("最少", Bound::AtLeast),
    ("起码", Bound::AtLeast),
    ("最多", Bound::AtMost),
    ("至多", Bound::AtMost),
    ("不到", Bound::AtMost),
    ("不足", Bound::AtMost),
];

/// Chinese comparatives before a number; a negation right before them, optionally
/// followed by a modal (不少于, 不得超过, 没有超过), reverses them.
const ZH_COMPARATIVES: &[(&str, Bound)] = &[
    ("超过", Bound::AtLeast),
    ("超出", Bound::AtLeast),
    ("多于", Bound::AtLeast),
    ("大于", Bound::AtLeast),
    ("高于", Bound::AtLeast),
    ("长于", Bound::AtLeast),
    ("少于", Bound::AtMost),
    ("小于", Bound::AtMost),
    ("低于", Bound::AtMost),
    ("短于", Bound::AtMost),
];

/// Modal words that may stand between a Chinese negation and a comparative, longest first.
const ZH_MODALS: &[&str] = &[
    "应该", "可以", "得", "能", "要", "应", "可", "宜", "会", "需", "有",
];

/// Chinese negations.
const ZH_NEGATIONS: &[char] = &['不', '勿', '别', '莫', '没', '未'];

/// Chinese phrases right after the unit ("2000字以内").
const ZH_SUFFIXES: &[(&str, Bound)] = &[
    ("以内", Bound::AtMost),
    ("之内", Bound::AtMost),
    ("以下", Bound::AtMost),
    ("以上", Bound::AtLeast),
];

/// How many characters before a number are searched for a qualifier.
const PREFIX_WINDOW: usize = 48;

/// How many characters after the unit are searched for a qualifier.
const SUFFIX_WINDOW: usize = 24;

/// The target range a question states, if it states one.
///
/// A length is a number followed by `word`/`words` (also hyphenated, "a 1,500-word
/// essay") or by `字` (optionally with 多/余/个 in between). Numbers may have thousands
/// separators (`1,500`), full-width digits, and a `k`, `千` or `万` multiplier with an
/// optional decimal part (`1.5k`, `1.5万`), or be Chinese numerals of a hundred or more
/// (两千, 一万, 三千五百, 一万五). The first length found decides:
///
/// - a range, "between 800 and 1,200 words", "800-1200 words", "from 800 to 1200
///   words", "800到1200字", gives `[800, 1200]`;
/// - "at most"/"no more than"/"under"/"fewer than"/"less than"/"up to"/"within"/"not
///   exceed" N, "N words or less"/"maximum", 不超过/不多于/最多/少于 N字 and "N字以内"
///   give `[0.9·N, N]`;
/// - "at least"/"more than"/"no less than"/"over"/"exceed" N, "N+ words", "N words or
///   more"/"minimum", 不少于/至少/超过 N字 and "N字以上" give `[N, 1.1·N]`;
/// - any other N words or N字 gives `[0.9·N, 1.1·N]`.
///
/// Bounds are rounded to the nearest word. Returns `None` when no length is stated or the
/// stated one cannot be a range (0 words, fractions of words, numbers beyond `u32`).
pub fn parse_length_range(question: &str) -> Option<LengthRange> {
    let chars: Vec<char> = question
        .chars()
        .flat_map(char::to_lowercase)
        .map(fold_full_width_digit)
        .collect();
    let chars = fold_chinese_numerals(chars);
    let mut i = 0;
    while i < chars.len() {
        let starts_number = chars[i].is_ascii_digit()
            && !i
                .checked_sub(1)
                .is_some_and(|p| chars[p].is_ascii_alphanumeric());
        if starts_number {
            if let Some(number) = number_at(&chars, i) {
                if let Some(range) = mention(&chars, i, &number) {
                    return Some(range);
                }
                i = number.end;
                continue;
            }
        }
        i += 1;
    }
    None
}

/// `０`–`９` as ASCII digits; any other character unchanged.
fn fold_full_width_digit(c: char) -> char {
    if ('０'..='９').contains(&c) {
        char::from_u32(c as u32 - 0xFEE0).unwrap_or(c)
    } else {
        c
    }
}

/// A number as written: all its digits, how many of them follow the decimal point, its
/// multiplier (1, or 1000 for `k`/`千`, 10,000 for `万`), and where it ends.
struct Number {
    mantissa: u64,
    decimals: u32,
    multiplier: u64,
    end: usize,
}

impl Number {
    /// Its value with `multiplier` applied, when that is a whole number.
    fn value(&self, multiplier: u64) -> Option<u64> {
        let scale = 10u64.checked_pow(self.decimals)?;
        let scaled = self.mantissa.checked_mul(multiplier)?;
        (scaled % scale == 0).then_some(scaled / scale)
    }
}

/// The ASCII digit at `j`, if there is one.
fn digit_at(chars: &[char], j: usize) -> Option<u64> {
    chars.get(j).and_then(|c| c.to_digit(10)).map(u64::from)
}

/// The number starting at `i`; `None` when there is none or it overflows.
fn number_at(chars: &[char], i: usize) -> Option<Number> {
    let push = |mantissa: u64, digit: u64| mantissa.checked_mul(10)?.checked_add(digit);
    let mut j = i;
    let mut mantissa = 0;
    while let Some(d) = digit_at(chars, j) {
        mantissa = push(mantissa, d)?;
        j += 1;
    }
    if j == i {
        return None;
    }
    while chars.get(j) == Some(&',')
        && (1..=3).all(|k| digit_at(chars, j + k).is_some())
        && digit_at(chars, j + 4).is_none()
    {
        for k in 1..=3 {
            mantissa = push(mantissa, digit_at(chars, j + k)?)?;
        }
        j += 4;
    }
    let mut decimals = 0;
    if chars.get(j) == Some(&'.') && digit_at(chars, j + 1).is_some() {
        j += 1;
        while let Some(d) = digit_at(chars, j) {
            mantissa = push(mantissa, d)?;
            decimals += 1;
            j += 1;
        }
    }
    let multiplier = match chars.get(j) {
        Some('k') if !chars.get(j + 1).is_some_and(char::is_ascii_alphabetic) => 1_000,
        Some('千') => 1_000,
        Some('万') => 10_000,
        _ => 1,
    };
    if multiplier > 1 {
        j += 1;
    }
    Some(Number {
        mantissa,
        decimals,
        multiplier,
        end: j,
    })
}

/// The index of the first non-whitespace character at or after `j`.
fn skip_whitespace(chars: &[char], mut j: usize) -> usize {
    while chars.get(j).is_some_and(|c| c.is_whitespace()) {
        j += 1;
    }
    j
}

/// Whether `text` is written at `j`.
fn written_at(chars: &[char], j: usize, text: &str) -> bool {
    text.chars()
        .enumerate()
        .all(|(k, c)| chars.get(j + k) == Some(&c))
}

/// The word-count unit right after a number ending at `j`: where the unit ends, and
/// whether a `+` came before it.
fn unit_at(chars: &[char], j: usize) -> Option<(usize, bool)> {
    let plus = chars.get(j) == Some(&'+');
    let mut k = skip_whitespace(chars, j + usize::from(plus));
    if matches!(chars.get(k), Some('-' | '\u{2010}' | '\u{2011}')) {
        k = skip_whitespace(chars, k + 1);
    }
    if written_at(chars, k, "word") {
        let mut end = k + 4;
        if chars.get(end) == Some(&'s') {
            end += 1;
        }
        let word_goes_on = chars
            .get(end)
            .is_some_and(|&c| c.is_alphanumeric() && !is_cjk(c));
        return (!word_goes_on).then_some((end, plus));
    }
    for _ in 0..2 {
        if matches!(chars.get(k), Some('多' | '余' | '个')) {
            k += 1;
        }
    }
    (chars.get(k) == Some(&'字')).then_some((k + 1, plus))
}

/// After the first number of a range (and its unit, if it has one) ending at `j`: where
/// the second number starts.
fn range_separator(chars: &[char], j: usize) -> Option<usize> {
    let k = skip_whitespace(chars, j);
    let after = match chars.get(k)? {
        '-' | '\u{2010}' | '\u{2011}' | '\u{2013}' | '\u{2014}' | '~' | '－' | '～' | '至'
        | '到' => k + 1,
        _ if k > j => ["to", "and"].iter().find_map(|word| {
            let end = k + word.len();
            (written_at(chars, k, word) && chars.get(end).is_some_and(|c| c.is_whitespace()))
                .then_some(end)
        })?,
        _ => return None,
    };
    Some(skip_whitespace(chars, after))
}

/// The range stated by a number `first` starting at `start`, if it is a length.
fn mention(chars: &[char], start: usize, first: &Number) -> Option<LengthRange> {
    let unit = unit_at(chars, first.end);
    if let Some(range) = range_after(chars, unit.map_or(first.end, |(end, _)| end), first) {
        return Some(range);
    }
    let (end, plus) = unit?;
    let prefix = &chars[start.saturating_sub(PREFIX_WINDOW)..start];
    let suffix = &chars[end..chars.len().min(end + SUFFIX_WINDOW)];
    let bound = prefix_bound(prefix)
        .or(plus.then_some(Bound::AtLeast))
        .or_else(|| suffix_bound(suffix))
        .unwrap_or(Bound::About);
    let n = first.value(first.multiplier)?;
    let tenths = |k: u64| Some(n.checked_mul(k)?.checked_add(5)? / 10);
    let (lo, hi) = match bound {
        Bound::About => (tenths(9)?, tenths(11)?),
        Bound::AtMost => (tenths(9)?, n),
        Bound::AtLeast => (n, tenths(11)?),
    };
    LengthRange::new(u32::try_from(lo).ok()?, u32::try_from(hi).ok()?).ok()
}

/// A range "first SEP second unit" whose separator starts at or after `j`.
fn range_after(chars: &[char], j: usize, first: &Number) -> Option<LengthRange> {
    let second = number_at(chars, range_separator(chars, j)?)?;
    unit_at(chars, second.end)?;
    let hi = second.value(second.multiplier)?;
    // "1-2k words": the second number's multiplier also applies to the first.
    let lo = if first.multiplier == 1 && second.multiplier > 1 {
        first
            .value(second.multiplier)
            .filter(|&lo| lo <= hi)
            .or_else(|| first.value(1))?
    } else {
        first.value(first.multiplier)?
    };
    let (lo, hi) = (lo.min(hi), lo.max(hi));
    LengthRange::new(u32::try_from(lo).ok()?, u32::try_from(hi).ok()?).ok()
}

/// The lowercase English words of `chars` (letters, digits and apostrophes).
fn english_words(chars: &[char]) -> Vec<String> {
    chars
        .split(|&c| !(c.is_alphanumeric() || c == '\'' || c == '\u{2019}'))
        .filter(|w| !w.is_empty())
        .map(|w| {
            w.iter()
                .map(|&c| if c == '\u{2019}' { '\'' } else { c })
                .collect()
        })
        .collect()
}

/// Whether an English word negates what follows it.
fn is_english_negation(word: &str) -> bool {
    matches!(word, "not" | "no" | "never" | "cannot") || word.ends_with("n't")
}

/// The bound that the text right before a number puts on it.
fn prefix_bound(prefix: &[char]) -> Option<Bound> {
    let words = english_words(prefix);
    let ends_with = |phrase: &[&str]| {
        words.len() >= phrase.len()
            && words[words.len() - phrase.len()..]
                .iter()
                .zip(phrase)
                .all(|(w, p)| w == p)
    };
    if let Some(&(_, bound)) = EN_FIXED.iter().find(|(phrase, _)| ends_with(phrase)) {
        return Some(bound);
    }
    if let Some(&(phrase, bound)) = EN_COMPARATIVES.iter().find(|(phrase, _)| ends_with(phrase)) {
        let before = &words[..words.len() - phrase.len()];
        let negated = before.iter().rev().take(2).any(|w| is_english_negation(w));
        return Some(if negated { bound.negated() } else { bound });
    }
    let text: String = prefix.iter().collect();
    let text = text.trim_end();
    if let Some(&(_, bound)) = ZH_FIXED.iter().find(|(phrase, _)| text.ends_with(phrase)) {
        return Some(bound);
    }
    let &(phrase, bound) = ZH_COMPARATIVES
        .iter()
        .find(|(phrase, _)| text.ends_with(phrase))?;
    let before = &text[..text.len() - phrase.len()];
    let before = ZH_MODALS
        .iter()
        .find_map(|modal| before.strip_suffix(modal))
        .unwrap_or(before);
    let negated = before.ends_with(ZH_NEGATIONS);
    Some(if negated { bound.negated() } else { bound })
}

/// The bound that the text right after a length's unit puts on it.
fn suffix_bound(suffix: &[char]) -> Option<Bound> {
    let words = english_words(suffix);
    let starts_with = |phrase: &[&str]| {
        words.len() >= phrase.len() && words.iter().zip(phrase.iter()).all(|(w, p)| w == p)
    };
    if let Some(&(_, bound)) = EN_SUFFIXES.iter().find(|(phrase, _)| starts_with(phrase)) {
        return Some(bound);
    }
    let text: String = suffix.iter().collect();
    let text = text.trim_start();
    ZH_SUFFIXES
        .iter()
        .find(|(phrase, _)| text.starts_with(phrase))
        .map(|&(_, bound)| bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::length::tests::range;

    fn assert_parses(questions: &[&str], expected: Option<LengthRange>) {
        for question in questions {
            assert_eq!(
                parse_length_range(question),
                expected,
                "question: {question}"
            );
        }
    }

    #[test]
    fn an_explicit_count_gives_ten_percent_either_way() {
        assert_parses(
            &[
                "Write an essay of 2,000 words about rivers.",
                "Write about 2000 words on rivers.",
                "In 2000 Words, describe a river.",
                "Write a 2,000-word essay.",
                "Write a 2k-word essay.",
                "写一篇2000字的文章。",
                "写一篇 2000 字左右的文章",
                "写一篇２０００字的散文",
                "写一篇2千字的文章",
            ],
            range(1800, 2200),
        );
        assert_parses(
            &[
                "Write a 1500-word story.",
                "Write 1.5k words.",
                "Write 1,500 words",
            ],
            range(1350, 1650),
        );
        assert_parses(
            &[
                "写一篇1.5万字的小说",
                "写一篇一万五千字的小说",
                "写一篇一万五字的小说",
            ],
            range(13_500, 16_500),
        );
        assert_parses(&["写一篇两千字的文章", "写二千字左右"], range(1800, 2200));
        assert_parses(&["写一篇一万字的小说"], range(9_000, 11_000));
        assert_parses(&["写一篇三千五百字的报告"], range(3_150, 3_850));
        assert_parses(&["Write a 333-word poem."], range(300, 366));
    }

    #[test]
    fn an_upper_limit_gives_the_ten_percent_below_it() {
        assert_parses(
            &[
                "Write no more than 2,000 words.",
                "Answer in not more than 2000 words.",
                "Keep it at most 2000 words.",
                "Explain in under 2,000 words.",
                "Use fewer than 2000 words.",
                "Use less than 2000 words.",
                "The essay should not exceed 2,000 words.",
                "The essay shouldn't exceed 2000 words.",
                "The essay must not be more than 2000 words long.",
                "Write up to 2000 words.",
                "Stay within 2000 words.",
                "Write a maximum of 2000 words.",
                "Write 2000 words or less.",
                "Write 2,000 words maximum.",
                "不超过2000字",
                "字数不多于2000字",
                "最多2000字",
                "文章不得超过 2000 字",
                "写一篇2000字以内的文章",
                "少于2000字",
                "不超过两千字",
            ],
            range(1800, 2000),
        );
    }

    #[test]
    fn a_lower_limit_gives_the_ten_percent_above_it() {
        assert_parses(
            &[
                "Write at least 2,000 words.",
                "Write more than 2000 words.",
                "Write no less than 2000 words.",
                "Write not fewer than 2000 words.",
                "Write over 2000 words.",
                "The story should exceed 2000 words.",
                "Write a minimum of 2000 words.",
                "Write 2000+ words.",
                "Write 2,000 words or more.",
                "不少于2000字",
                "至少2000字",
                "超过2000字",
                "写2000字以上的文章",
                "不少于两千字",
            ],
            range(2000, 2200),
        );
    }

    #[test]
    fn ranges_give_their_bounds() {
        assert_parses(
            &[
                "Write between 800 and 1,200 words.",
                "Write 800-1200 words.",
                "Write an 800–1,200-word essay.",
                "Write from 800 to 1200 words.",
                "Write between 800 words and 1200 words.",
                "Write 1200-800 words.",
                "写800到1200字",
                "写800字至1200字的文章",
                "写800~1200字",
                "写八百到一千二百字",
            ],
            range(800, 1200),
        );
        assert_parses(
            &["Write 1-2k words.", "Write 1k-2k words."],
            range(1000, 2000),
        );
        assert_parses(&["Write 800-1.2k words."], range(800, 1200));
    }

    #[test]
    fn no_stated_length_gives_none() {
        assert_parses(
            &[
                "",
                "Write a poem about 3 cats.",
                "Write a story set in 1984.",
                "Write 5 paragraphs in 3 to 4 sections.",
                "Describe the wordless 400 wordsmiths.",
                "Write a 10-chapter novel.",
                "写一篇关于春天的文章",
                "写一篇关于十字路口的文章",
                "写三四千字",
                "Write 0 words.",
                "Write 2.5 words.",
                "Write 99999999999999999999999 words.",
                "Write 4000000000 words.",
                "Write v2 words and GPT4 words.",
            ],
            None,
        );
    }

    #[test]
    fn the_first_stated_length_decides() {
        assert_parses(
            &[
                "Write 3 to 5 paragraphs of 500 words each, 800 words at most in all.",
                "Write 500 words, then 800 more words.",
            ],
            range(450, 550),
        );
    }
}

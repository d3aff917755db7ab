//! Chinese numerals in stated lengths (两千字, 一万字, 三千五百字, 一万五): written out as
//! ASCII digits before the length rules read the question.

/// The value of a Chinese digit character (`零`/`〇` are 0, `两` is 2).
fn digit(c: char) -> Option<u64> {
    Some(match c {
        '零' | '〇' => 0,
        '一' => 1,
        '二' | '两' => 2,
        '三' => 3,
        '四' => 4,
        '五' => 5,
        '六' => 6,
        '七' => 7,
        '八' => 8,
        '九' => 9,
        _ => return None,
    })
}

/// The value of a Chinese unit character below 万.
fn small_unit(c: char) -> Option<u64> {
    Some(match c {
        '十' => 10,
        '百' => 100,
        '千' => 1_000,
        _ => return None,
    })
}

fn is_numeral(c: char) -> bool {
    digit(c).is_some() || small_unit(c).is_some() || c == '万'
}

/// The value of a run of Chinese numeral characters, or `None` when it is not a well-formed
/// number (two digits in a row such as 三四千 "three or four thousand", a unit twice).
/// A digit after the last unit counts one place below it, as spoken: 两千五 is 2,500 and
/// 一万五 is 15,000.
fn value(run: &[char]) -> Option<u64> {
    let (mut total, mut section) = (0u64, 0u64);
    let mut pending: Option<u64> = None;
    let mut last_unit = u64::MAX;
    let mut after_zero = false;
    for &c in run {
        if let Some(d) = digit(c) {
            if pending.is_some() {
                return None;
            }
            after_zero = d == 0;
            pending = (d != 0).then_some(d);
        } else if let Some(unit) = small_unit(c) {
            if unit >= last_unit && last_unit != 10_000 {
                return None;
            }
            section += pending.take().unwrap_or(1) * unit;
            last_unit = unit;
            after_zero = false;
        } else {
            if total != 0 || last_unit == 10_000 {
                return None;
            }
            total = (section + pending.take().unwrap_or(0)).max(1) * 10_000;
            section = 0;
            last_unit = 10_000;
            after_zero = false;
        }
    }
    if let Some(d) = pending {
        let place = if !after_zero && last_unit >= 100 && last_unit != u64::MAX {
            last_unit / 10
        } else {
            1
        };
        section += d * place;
    }
    Some(total + section)
}

/// `chars` with every run of Chinese numerals that starts with a digit or 十 and reaches
/// the hundreds (百, 千 or 万) replaced by its ASCII digits. Smaller runs stay as they are,
/// so words such as 十字路口 or 一篇 are not read as numbers.
pub(super) fn fold_chinese_numerals(chars: Vec<char>) -> Vec<char> {
    if !chars.iter().any(|&c| matches!(c, '百' | '千' | '万')) {
        return chars;
    }
    let mut out = Vec::with_capacity(chars.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let starts = digit(c).is_some() || c == '十';
        let after_digit = i > 0 && chars[i - 1].is_ascii_digit();
        if starts && !after_digit {
            let end = (i..chars.len())
                .find(|&j| !is_numeral(chars[j]))
                .unwrap_or(chars.len());
            let run = &chars[i..end];
            let large = run.iter().any(|&c| matches!(c, '百' | '千' | '万'));
            match value(run).filter(|_| large) {
                Some(n) => out.extend(n.to_string().chars()),
                None => out.extend_from_slice(run),
            }
            i = end;
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fold(text: &str) -> String {
        fold_chinese_numerals(text.chars().collect())
            .into_iter()
            .collect()
    }

    #[test]
    fn numerals_become_digits() {
        for (zh, n) in [
            ("两千", "2000"),
            ("一万", "10000"),
            ("三千五百", "3500"),
            ("两千五", "2500"),
            ("一万五", "15000"),
            ("一万五千", "15000"),
            ("五百", "500"),
            ("八百五十", "850"),
            ("一千零五十", "1050"),
            ("十万", "100000"),
            ("一千二百", "1200"),
            ("二十万", "200000"),
        ] {
            assert_eq!(fold(zh), n, "{zh}");
        }
    }

    #[test]
    fn small_or_malformed_runs_stay() {
        for text in [
            "十字路口",
            "一篇文章",
            "三四千字",
            "千字文",
            "五十字",
            "二二百",
        ] {
            assert_eq!(fold(text), text);
        }
        assert_eq!(fold("写一篇两千字的文章"), "写一篇2000字的文章");
    }
}

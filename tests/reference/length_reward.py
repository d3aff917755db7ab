"""A Python port of quill's length reward (crate `quill-reward`), for baselines that must
score exactly as quill does, e.g. TRL in `quill bench rl` (tests/reference/rl_bench.py).

Ported function by function, with the Rust names:

- `reward/src/text.rs`: `is_cjk`, `words`, `count_words`, and the answer of
  `split_response` (its `well_formed` flag belongs to the format reward and is left out);
- `reward/src/format.rs`: `effective_word_count` (the word count without repeated
  paragraphs and sentences, which is what the length reward counts);
- `reward/src/length/mod.rs`: `LengthRange`, `length_reward`, `response_length_reward`;
- `reward/src/length/parse.rs`: `parse_length_range`.

Rust's character classes are reproduced, not approximated by Python's: `is_alphanumeric`
is the Unicode Alphabetic property or a number (Nd, Nl, No), `is_whitespace` the
White_Space property (both through the `regex` module, which transformers installs),
`str::lines` splits at `\\n` and `\\r\\n` only, and lowercasing maps one character at a
time (no final-sigma rule). Python's case tables (Unicode 14 in Python 3.11) may lag
Rust's for letters added since; nothing else differs. `tests/reward_port.rs` checks this
port against the Rust functions.
"""

import regex

_ALPHANUMERIC = regex.compile(r"[\p{Alphabetic}\p{Nd}\p{Nl}\p{No}]")
_WHITESPACE = regex.compile(r"\p{White_Space}")

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def is_alphanumeric(c):
    """Rust's `char::is_alphanumeric`."""
    return _ALPHANUMERIC.match(c) is not None


def is_whitespace(c):
    """Rust's `char::is_whitespace`."""
    return _WHITESPACE.match(c) is not None


def trim_start(s):
    i = 0
    while i < len(s) and is_whitespace(s[i]):
        i += 1
    return s[i:]


def trim_end(s):
    j = len(s)
    while j > 0 and is_whitespace(s[j - 1]):
        j -= 1
    return s[:j]


def to_lowercase(s):
    """`s.chars().flat_map(char::to_lowercase)`."""
    return "".join(c.lower() for c in s)


def is_ascii_digit(c):
    return "0" <= c <= "9"


def rust_lines(text):
    """Rust's `str::lines`: split at `\\n`, drop one `\\r` before it, no final empty line."""
    pieces = text.split("\n")
    ended = pieces[:-1]
    lines = [p[:-1] if p.endswith("\r") else p for p in ended]
    if pieces[-1]:
        lines.append(pieces[-1])
    return lines


# ---- reward/src/text.rs ----


def is_cjk(c):
    """A CJK ideograph (U+3400–4DBF, U+4E00–9FFF, U+F900–FAFF, U+20000–2FA1F)."""
    o = ord(c)
    return 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FA1F


def is_word_char(c):
    return is_alphanumeric(c) and not is_cjk(c)


def is_digit_separator(prev, c, nxt):
    return c in ".," and is_ascii_digit(prev) and is_ascii_digit(nxt)


def joins(prev, c, nxt):
    return c in "'\u2019-\u2010\u2011" or is_digit_separator(prev, c, nxt)


def words(text):
    """The words of `text`: each CJK ideograph on its own, and each maximal run of other
    letters and digits, where an apostrophe or hyphen between two of them and a `.` or
    `,` between two ASCII digits stay inside the word."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if is_cjk(c):
            out.append(c)
            i += 1
            continue
        if not is_word_char(c):
            i += 1
            continue
        start, end, prev = i, i + 1, c
        while end < n:
            c = text[end]
            if is_word_char(c):
                end, prev = end + 1, c
                continue
            nxt = text[end + 1] if end + 1 < n else None
            if nxt is not None and is_word_char(nxt) and joins(prev, c, nxt):
                end, prev = end + 2, nxt
            else:
                break
        out.append(text[start:end])
        i = end
    return out


def count_words(text):
    return len(words(text))


def _block(text, start_from, open_tag, close_tag):
    """(content start, content stop, end past the closing tag) of the block from the
    first `open_tag` at or after `start_from` to the first `close_tag` after it."""
    open_at = text.find(open_tag, start_from)
    if open_at < 0:
        return None
    start = open_at + len(open_tag)
    stop = text.find(close_tag, start)
    if stop < 0:
        return None
    return start, stop, stop + len(close_tag)


def split_response(response):
    """`(think, answer)` of `split_response`: the text between the first `<think>` and
    the first `</think>` after it, and the text between the first `<answer>` after the
    think block (after the start when there is none) and the first `</answer>` after it;
    `None` for a block whose tags are missing."""
    think = _block(response, 0, THINK_OPEN, THINK_CLOSE)
    answer = _block(response, think[2] if think else 0, ANSWER_OPEN, ANSWER_CLOSE)
    return tuple(None if b is None else response[b[0] : b[1]] for b in (think, answer))


# ---- reward/src/format.rs (the effective word count) ----

MIN_WORDS = 3
SENTENCE_ENDS = ".!?。！？"


class _Repeats:
    def __init__(self):
        self.seen = set()

    def is_repeat(self, key, n):
        if n < MIN_WORDS:
            return False
        if key in self.seen:
            return True
        self.seen.add(key)
        return False


def _paragraphs(text):
    paragraphs, current = [], []
    for line in rust_lines(text):
        if not trim_end(line):
            if current:
                paragraphs.append(current)
                current = []
        else:
            current.append(line)
    if current:
        paragraphs.append(current)
    return paragraphs


def _sentences(line):
    sentences, start, prev = [], 0, None
    for i, c in enumerate(line):
        nxt = line[i + 1] if i + 1 < len(line) else None
        in_number = prev is not None and nxt is not None and is_digit_separator(prev, c, nxt)
        if c in SENTENCE_ENDS and not in_number:
            sentences.append(line[start:i])
            start = i + 1
        prev = c
    sentences.append(line[start:])
    return sentences


def _comparison_key(parts):
    ws = [to_lowercase(w) for part in parts for w in words(part)]
    return " ".join(ws), len(ws)


def effective_word_count(answer):
    """The word count of `answer` without its repeated paragraphs and sentences (compared
    by their lowercased words; pieces under 3 words never repeat)."""
    paragraphs, sentences, effective = _Repeats(), _Repeats(), 0
    for paragraph in _paragraphs(answer):
        paragraph_repeats = paragraphs.is_repeat(*_comparison_key(paragraph))
        for sentence in (s for line in paragraph for s in _sentences(line)):
            key, n = _comparison_key([sentence])
            if not sentences.is_repeat(key, n) and not paragraph_repeats:
                effective += n
    return effective


# ---- reward/src/length/mod.rs ----

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


class InvalidRange(ValueError):
    pass


class LengthRange:
    """A target word range `[lo, hi]`, both ends included, `lo <= hi`, `hi > 0`."""

    def __init__(self, lo, hi):
        if not (0 <= lo <= U32_MAX and 0 <= hi <= U32_MAX):
            raise InvalidRange(f"invalid length range [{lo}, {hi}]: a bound is outside 0..=4294967295")
        if hi == 0:
            problem = "the upper bound is 0, so no answer can meet it"
        elif lo > hi:
            problem = "the lower bound is above the upper bound"
        else:
            self.lo, self.hi = lo, hi
            return
        raise InvalidRange(f"invalid length range [{lo}, {hi}]: {problem}")

    def __eq__(self, other):
        return isinstance(other, LengthRange) and (self.lo, self.hi) == (other.lo, other.hi)

    def __repr__(self):
        return f"LengthRange({self.lo}, {self.hi})"


def length_reward(words, length_range, l_max):
    """1 inside the range, words/lo below it, falling linearly from 1 at hi to 0 at l_max
    above it (0 above it when l_max <= hi)."""
    lo, hi = length_range.lo, length_range.hi
    if words < lo:
        return words / lo
    if words <= hi:
        return 1.0
    if l_max <= hi:
        return 0.0
    return min(max((float(l_max) - float(words)) / (float(l_max) - float(hi)), 0.0), 1.0)


def response_length_reward(response, length_range, l_max):
    """`length_reward` of the answer's effective word count; 0 without a complete answer."""
    _, answer = split_response(response)
    if answer is None:
        return 0.0
    return length_reward(effective_word_count(answer), length_range, l_max)


# ---- reward/src/length/parse.rs ----

ABOUT, AT_MOST, AT_LEAST = "about", "at_most", "at_least"
NEGATED = {ABOUT: ABOUT, AT_MOST: AT_LEAST, AT_LEAST: AT_MOST}

EN_FIXED = [
    (["at", "most"], AT_MOST),
    (["up", "to"], AT_MOST),
    (["within"], AT_MOST),
    (["maximum"], AT_MOST),
    (["maximum", "of"], AT_MOST),
    (["max"], AT_MOST),
    (["at", "least"], AT_LEAST),
    (["minimum"], AT_LEAST),
    (["minimum", "of"], AT_LEAST),
    (["min"], AT_LEAST),
    (["upwards", "of"], AT_LEAST),
    (["in", "excess", "of"], AT_LEAST),
]

EN_COMPARATIVES = [
    (["more", "than"], AT_LEAST),
    (["longer", "than"], AT_LEAST),
    (["over"], AT_LEAST),
    (["above"], AT_LEAST),
    (["exceed"], AT_LEAST),
    (["exceeds"], AT_LEAST),
    (["exceeding"], AT_LEAST),
    (["less", "than"], AT_MOST),
    (["fewer", "than"], AT_MOST),
    (["shorter", "than"], AT_MOST),
    (["under"], AT_MOST),
    (["below"], AT_MOST),
]

EN_SUFFIXES = [
    (["or", "less"], AT_MOST),
    (["or", "fewer"], AT_MOST),
    (["or", "under"], AT_MOST),
    (["or", "below"], AT_MOST),
    (["or", "shorter"], AT_MOST),
    (["and", "under"], AT_MOST),
    (["at", "most"], AT_MOST),
    (["at", "the", "most"], AT_MOST),
    (["maximum"], AT_MOST),
    (["max"], AT_MOST),
    (["tops"], AT_MOST),
    (["or", "more"], AT_LEAST),
    (["or", "longer"], AT_LEAST),
    (["or", "above"], AT_LEAST),
    (["or", "over"], AT_LEAST),
    (["and", "above"], AT_LEAST),
    (["and", "over"], AT_LEAST),
    (["and", "up"], AT_LEAST),
    (["at", "least"], AT_LEAST),
    (["minimum"], AT_LEAST),
    (["min"], AT_LEAST),
    (["plus"], AT_LEAST),
]

ZH_FIXED = [
    ("至少", AT_LEAST),
    ("最少", AT_LEAST),
    ("起码", AT_LEAST),
    ("最多", AT_MOST),
    ("至多", AT_MOST),
    ("不到", AT_MOST),
    ("不足", AT_MOST),
]

ZH_COMPARATIVES = [
    ("超过", AT_LEAST),
    ("超出", AT_LEAST),
    ("多于", AT_LEAST),
    ("大于", AT_LEAST),
    ("高于", AT_LEAST),
    ("长于", AT_LEAST),
    ("少于", AT_MOST),
    ("小于", AT_MOST),
    ("低于", AT_MOST),
    ("短于", AT_MOST),
]

ZH_MODALS = ["应该", "可以", "得", "能", "要", "应", "可", "宜", "会", "需", "有"]

ZH_NEGATIONS = "不勿别莫没未"

ZH_SUFFIXES = [("以内", AT_MOST), ("之内", AT_MOST), ("以下", AT_MOST), ("以上", AT_LEAST)]

PREFIX_WINDOW = 48
SUFFIX_WINDOW = 24


def parse_length_range(question):
    """The target range a question states ("between 800 and 1,200 words", "不超过2000字"),
    or `None`; see `parse_length_range` in reward/src/length/parse.rs."""
    chars = _fold_chinese_numerals([_fold_full_width_digit(c) for c in to_lowercase(question)])
    i = 0
    while i < len(chars):
        starts_number = is_ascii_digit(chars[i]) and not (i > 0 and _is_ascii_alphanumeric(chars[i - 1]))
        if starts_number:
            number = _number_at(chars, i)
            if number is not None:
                found = _mention(chars, i, number)
                if found is not None:
                    return found
                i = number.end
                continue
        i += 1
    return None


_ZH_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6,
              "七": 7, "八": 8, "九": 9}
_ZH_SMALL_UNITS = {"十": 10, "百": 100, "千": 1000}
_NO_UNIT = 1 << 64


def _zh_numeral_value(run):
    """See `value` in reward/src/length/zh_numerals.rs."""
    total, section, pending, last_unit, after_zero = 0, 0, None, _NO_UNIT, False
    for c in run:
        if c in _ZH_DIGITS:
            if pending is not None:
                return None
            d = _ZH_DIGITS[c]
            after_zero = d == 0
            pending = d if d != 0 else None
        elif c in _ZH_SMALL_UNITS:
            unit = _ZH_SMALL_UNITS[c]
            if unit >= last_unit and last_unit != 10000:
                return None
            section += (pending if pending is not None else 1) * unit
            pending, last_unit, after_zero = None, unit, False
        else:
            if total != 0 or last_unit == 10000:
                return None
            total = max(section + (pending or 0), 1) * 10000
            section, pending, last_unit, after_zero = 0, None, 10000, False
    if pending is not None:
        place = last_unit // 10 if (not after_zero and 100 <= last_unit != _NO_UNIT) else 1
        section += pending * place
    return total + section


def _fold_chinese_numerals(chars):
    """See `fold_chinese_numerals` in reward/src/length/zh_numerals.rs."""
    if not any(c in "百千万" for c in chars):
        return chars
    numeral = lambda c: c in _ZH_DIGITS or c in _ZH_SMALL_UNITS or c == "万"
    out, i = [], 0
    while i < len(chars):
        c = chars[i]
        if (c in _ZH_DIGITS or c == "十") and not (i > 0 and is_ascii_digit(chars[i - 1])):
            end = i
            while end < len(chars) and numeral(chars[end]):
                end += 1
            run = chars[i:end]
            value = _zh_numeral_value(run) if any(x in "百千万" for x in run) else None
            out.extend(list(str(value)) if value is not None else run)
            i = end
            continue
        out.append(c)
        i += 1
    return out


def _is_ascii_alphanumeric(c):
    return c.isascii() and c.isalnum()


def _is_ascii_alphabetic(c):
    return c.isascii() and c.isalpha()


def _fold_full_width_digit(c):
    return chr(ord(c) - 0xFEE0) if "０" <= c <= "９" else c


class _Number:
    def __init__(self, mantissa, decimals, multiplier, end):
        self.mantissa, self.decimals, self.multiplier, self.end = mantissa, decimals, multiplier, end

    def value(self, multiplier):
        """Its value with `multiplier` applied, when that is a whole number (`None` on
        u64 overflow)."""
        scale = 10**self.decimals
        scaled = self.mantissa * multiplier
        if scale > U64_MAX or scaled > U64_MAX or scaled % scale != 0:
            return None
        return scaled // scale


def _get(chars, j):
    return chars[j] if j < len(chars) else None


def _digit_at(chars, j):
    c = _get(chars, j)
    return int(c) if c is not None and is_ascii_digit(c) else None


def _number_at(chars, i):
    def push(mantissa, digit):
        mantissa = mantissa * 10 + digit
        return mantissa if mantissa <= U64_MAX else None

    j, mantissa = i, 0
    while (d := _digit_at(chars, j)) is not None:
        mantissa = push(mantissa, d)
        if mantissa is None:
            return None
        j += 1
    if j == i:
        return None
    while (
        _get(chars, j) == ","
        and all(_digit_at(chars, j + k) is not None for k in (1, 2, 3))
        and _digit_at(chars, j + 4) is None
    ):
        for k in (1, 2, 3):
            mantissa = push(mantissa, _digit_at(chars, j + k))
            if mantissa is None:
                return None
        j += 4
    decimals = 0
    if _get(chars, j) == "." and _digit_at(chars, j + 1) is not None:
        j += 1
        while (d := _digit_at(chars, j)) is not None:
            mantissa = push(mantissa, d)
            if mantissa is None:
                return None
            decimals += 1
            j += 1
    c = _get(chars, j)
    nxt = _get(chars, j + 1)
    if c == "k" and not (nxt is not None and _is_ascii_alphabetic(nxt)):
        multiplier = 1_000
    elif c == "千":
        multiplier = 1_000
    elif c == "万":
        multiplier = 10_000
    else:
        multiplier = 1
    if multiplier > 1:
        j += 1
    return _Number(mantissa, decimals, multiplier, j)


def _skip_whitespace(chars, j):
    while j < len(chars) and is_whitespace(chars[j]):
        j += 1
    return j


def _written_at(chars, j, text):
    return all(_get(chars, j + k) == c for k, c in enumerate(text))


def _unit_at(chars, j):
    """(where the unit ends, whether a `+` came before it), or `None`."""
    plus = _get(chars, j) == "+"
    k = _skip_whitespace(chars, j + int(plus))
    if _get(chars, k) in ("-", "\u2010", "\u2011"):
        k = _skip_whitespace(chars, k + 1)
    if _written_at(chars, k, "word"):
        end = k + 4
        if _get(chars, end) == "s":
            end += 1
        c = _get(chars, end)
        word_goes_on = c is not None and is_alphanumeric(c) and not is_cjk(c)
        return None if word_goes_on else (end, plus)
    for _ in range(2):
        if _get(chars, k) in ("多", "余", "个"):
            k += 1
    return (k + 1, plus) if _get(chars, k) == "字" else None


def _range_separator(chars, j):
    k = _skip_whitespace(chars, j)
    c = _get(chars, k)
    if c is None:
        return None
    if c in "-\u2010\u2011\u2013\u2014~－～至到":
        after = k + 1
    elif k > j:
        after = None
        for word in ("to", "and"):
            end = k + len(word)
            nxt = _get(chars, end)
            if _written_at(chars, k, word) and nxt is not None and is_whitespace(nxt):
                after = end
                break
        if after is None:
            return None
    else:
        return None
    return _skip_whitespace(chars, after)


def _checked_range(lo, hi):
    if lo > U32_MAX or hi > U32_MAX:
        return None
    try:
        return LengthRange(lo, hi)
    except InvalidRange:
        return None


def _mention(chars, start, first):
    unit = _unit_at(chars, first.end)
    found = _range_after(chars, unit[0] if unit else first.end, first)
    if found is not None:
        return found
    if unit is None:
        return None
    end, plus = unit
    prefix = chars[max(start - PREFIX_WINDOW, 0) : start]
    suffix = chars[end : min(len(chars), end + SUFFIX_WINDOW)]
    bound = _prefix_bound(prefix)
    if bound is None and plus:
        bound = AT_LEAST
    if bound is None:
        bound = _suffix_bound(suffix)
    if bound is None:
        bound = ABOUT
    n = first.value(first.multiplier)
    if n is None:
        return None

    def tenths(k):
        v = n * k + 5
        return v // 10 if v <= U64_MAX else None

    if bound == ABOUT:
        lo, hi = tenths(9), tenths(11)
    elif bound == AT_MOST:
        lo, hi = tenths(9), n
    else:
        lo, hi = n, tenths(11)
    if lo is None or hi is None:
        return None
    return _checked_range(lo, hi)


def _range_after(chars, j, first):
    sep = _range_separator(chars, j)
    if sep is None:
        return None
    second = _number_at(chars, sep)
    if second is None or _unit_at(chars, second.end) is None:
        return None
    hi = second.value(second.multiplier)
    if hi is None:
        return None
    if first.multiplier == 1 and second.multiplier > 1:
        lo = first.value(second.multiplier)
        if lo is None or lo > hi:
            lo = first.value(1)
    else:
        lo = first.value(first.multiplier)
    if lo is None:
        return None
    return _checked_range(min(lo, hi), max(lo, hi))


def _english_words(chars):
    out, current = [], []
    for c in chars:
        if is_alphanumeric(c) or c in ("'", "\u2019"):
            current.append("'" if c == "\u2019" else c)
        elif current:
            out.append("".join(current))
            current = []
    if current:
        out.append("".join(current))
    return out


def _is_english_negation(word):
    return word in ("not", "no", "never", "cannot") or word.endswith("n't")


def _prefix_bound(prefix):
    ws = _english_words(prefix)

    def ends_with(phrase):
        return len(ws) >= len(phrase) and ws[len(ws) - len(phrase) :] == phrase

    for phrase, bound in EN_FIXED:
        if ends_with(phrase):
            return bound
    for phrase, bound in EN_COMPARATIVES:
        if ends_with(phrase):
            before = ws[: len(ws) - len(phrase)]
            negated = any(_is_english_negation(w) for w in before[::-1][:2])
            return NEGATED[bound] if negated else bound
    text = trim_end("".join(prefix))
    for phrase, bound in ZH_FIXED:
        if text.endswith(phrase):
            return bound
    for phrase, bound in ZH_COMPARATIVES:
        if text.endswith(phrase):
            before = text[: len(text) - len(phrase)]
            for modal in ZH_MODALS:
                if before.endswith(modal):
                    before = before[: len(before) - len(modal)]
                    break
            negated = before.endswith(tuple(ZH_NEGATIONS))
            return NEGATED[bound] if negated else bound
    return None


def _suffix_bound(suffix):
    ws = _english_words(suffix)
    for phrase, bound in EN_SUFFIXES:
        if len(ws) >= len(phrase) and ws[: len(phrase)] == phrase:
            return bound
    text = trim_start("".join(suffix))
    for phrase, bound in ZH_SUFFIXES:
        if text.startswith(phrase):
            return bound
    return None

"""Numbers in GSM8K-style text: canonical form, spelled-out numbers, answer markers."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

_NUM = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
# A number in prose: optional attached minus sign and `$`, thousands commas, decimals.
NUMBER_RE = re.compile(rf"(?<![\d.,])(-)?\$?\s?({_NUM})")
CALC_RE = re.compile(r"(\$?)<<([^<>=]*)=([^<>]*)>>")
_MARKER_RE = re.compile(
    r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}|answer\s*(?:is\s*)?:|answer\s+is\b|####", re.IGNORECASE
)
_FRAC_RE = re.compile(r"\\d?frac\{(\d+)\}\{(\d+)\}")
_SMALL = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_WORD_VALUE = {w: i for i, w in enumerate(_SMALL)} | {
    w: 20 + 10 * i
    for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())
}
_SCALE = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
_W = "|".join([*_WORD_VALUE, *_SCALE])
WORD_NUMBER_RE = re.compile(rf"\b(?:{_W})(?:(?:\s+and\s+|[\s-]+)(?:{_W}))*\b", re.IGNORECASE)


def _decimal_text(d: Decimal) -> str:
    return str(int(d)) if d == d.to_integral_value() else format(d.normalize(), "f")


def canonical_number(text: str | None) -> str | None:
    """`1234.5` for `$1,234.50`; None when text holds no number (in digits)."""
    if text is None:
        return None
    m = NUMBER_RE.search(text)
    if m is None:
        return None
    try:
        d = Decimal((m.group(1) or "") + m.group(2).replace(",", ""))
    except InvalidOperation:
        return None
    return _decimal_text(d)


def words_to_int(text: str) -> int:
    """`125` for "one hundred and twenty-five" (a run WORD_NUMBER_RE found)."""
    total = current = 0
    for w in re.findall(r"[a-z]+", text.lower()):
        if w in _WORD_VALUE:
            current += _WORD_VALUE[w]
        elif w == "hundred":
            current = (current or 1) * 100
        elif w in _SCALE:
            total, current = total + (current or 1) * _SCALE[w], 0
    return total + current


def _stated_number(segment: str) -> str | None:
    """The number a marker's segment states: digits, a `\\frac`, or words ("twelve")."""
    segment = _FRAC_RE.sub(lambda m: str(Decimal(m[1]) / Decimal(max(int(m[2]), 1))), segment)
    if "=" in segment:  # `Answer: 5 + 3 = 8` means the value after the last `=`
        segment = segment.rsplit("=", 1)[1]
    value = canonical_number(segment)
    if value is None and (m := WORD_NUMBER_RE.search(segment)):
        value = str(words_to_int(m.group(0)))
    return value


def last_marker(output: str) -> tuple[str | None, int]:
    """(canonical value after the last marker that states one, where that marker starts)."""
    for m in reversed(list(_MARKER_RE.finditer(output))):
        segment = m.group(1) if m.group(1) is not None else output[m.end() :].split("\n", 1)[0]
        value = _stated_number(segment)
        if value is not None:
            return value, m.start()
    return None, len(output)


def extract_number(output: str) -> str | None:
    """The answer number: after the last marker (`\\boxed{}`, `Answer:`, `the answer is`,
    `####`) that has one, else the last number in the text; canonical form, None if none."""
    value, _ = last_marker(output)
    if value is not None:
        return value
    numbers = list(NUMBER_RE.finditer(CALC_RE.sub("", output)))
    return canonical_number(numbers[-1].group(0)) if numbers else None


def to_fraction(text: str) -> Fraction | None:
    """`Fraction('1234.5')` for `$1,234.5`; None when text is not one number."""
    try:
        return Fraction(text.replace(",", "").replace("$", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


def numbers_in(text: str, *, words: bool = True) -> list[tuple[int, Fraction]]:
    """(position, value) of the numbers in text; spelled-out ones only when none in digits."""
    out = [
        (m.start(), Fraction((m[1] or "") + m[2].replace(",", "")))
        for m in NUMBER_RE.finditer(text)
    ]
    if not out and words:
        out = [(m.start(), Fraction(words_to_int(m[0]))) for m in WORD_NUMBER_RE.finditer(text)]
    return out

"""`numeric`: GSM8K-style final numbers. The answer is the boxed one (ORZ format), else the number after the
last `#### `, else after the last "answer is", else the last number in the response's last 300 characters.
Commas, currency signs, `%`, `^\\circ` and trailing units are dropped; `\\frac{a}{b}`, `a/b` and decimals are
compared exactly as fractions (18 = 18.0 = 18.00; 0.5 = 1/2). Numbers are capped at 40 digits.
"""

from __future__ import annotations

import re
from fractions import Fraction

from reward_server.extract import answer_block, last_boxed_content
from reward_server.graders.base import TaskGrader, Verdict

TAIL_CHARS = 300
_NUMBER = r"-?\d[\d,]{0,40}(?:\.\d{1,40})?|-?\.\d{1,40}"
_NUMBER_RE = re.compile(_NUMBER)
_HASHES = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
_WRAPPERS = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{[^{}]{0,40}\}|\\[,;!]|\\?\$|\\?%|\^\s*\{?\\circ\}?|\\circ")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\s*\{\s*(-?\d{1,40})\s*\}\s*\{\s*(\d{1,40})\s*\}$")
_SLASH = re.compile(r"^(-?\d{1,40})\s*/\s*(\d{1,40})$")
_PLAIN = re.compile(r"^-?(?:\d{1,40}(?:\.\d{0,40})?|\.\d{1,40})$")


def to_fraction(text: str) -> Fraction | None:
    """The number `text` states, or None. Inputs over 100 characters are not numbers here."""
    if len(text) > 100:
        return None
    s = _WRAPPERS.sub("", text).strip().rstrip(".")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s).replace(" ", "")
    s = re.sub(r"[A-Za-z]+$", "", s)  # a trailing unit: 18dollars, 5cm
    m = _FRAC.match(s)
    if m:
        num, den = int(m.group(2)), int(m.group(3))
        return None if den == 0 else Fraction(-num if m.group(1) else num, den)
    m = _SLASH.match(s)
    if m:
        den = int(m.group(2))
        return None if den == 0 else Fraction(int(m.group(1)), den)
    if _PLAIN.match(s):
        return Fraction(s)
    return None


def _last(pattern: re.Pattern, text: str) -> str | None:
    found = None
    for m in pattern.finditer(text):
        found = m.group(1) if pattern.groups else m.group(0)
    return found


class NumericGrader(TaskGrader):
    name = "numeric"

    def extract(self, response: str) -> str | None:
        block = answer_block(response)
        for text in ((block,) if block is not None else ()) + (response,):
            boxed = last_boxed_content(text, max_chars=100)
            if boxed is not None:
                return boxed
        tail = response[-TAIL_CHARS * 4:]
        return _last(_HASHES, tail) or _last(_ANSWER_IS, tail) or _last(_NUMBER_RE, response[-TAIL_CHARS:])

    def compare(self, reference: str, answer: str, timeout_s: int) -> Verdict:
        ref = to_fraction(reference.split("####")[-1])
        got = to_fraction(answer)
        return "correct" if ref is not None and got is not None and ref == got else "wrong"

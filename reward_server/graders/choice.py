"""`choice`: multiple choice (GPQA Diamond): the reference is a letter, the answer is the letter the response
commits to last — a boxed letter (`\\boxed{C}`, `\\boxed{\\text{(C)}}`), or a stated one ("The answer is (B)",
"Answer: C", "**Answer:** D", "the correct option is A"). Only the last 2,000 characters are read.
"""

from __future__ import annotations

import re

from reward_server.extract import answer_block, last_boxed_content
from reward_server.graders.base import TaskGrader, Verdict

TAIL_CHARS = 2000
_BOXED_LETTER = re.compile(r"^\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?\(?\s*([A-J])\s*\)?\s*\}?\s*[.:]?\s*$")
_STATED = re.compile(
    r"(?:answer|option|choice)\s*(?:is|:|=)?\s*(?:\*\*)?\s*(?:option|choice)?\s*[:=]?\s*\(?\s*\\?(?:text\{)?([A-J])\b",
    re.IGNORECASE)
_LONE = re.compile(r"^\s*\(?([A-J])\)?\s*[.:]?\s*$")


def _letter(text: str) -> str | None:
    boxed = last_boxed_content(text, max_chars=64)
    if boxed is not None:
        m = _BOXED_LETTER.match(boxed)
        if m:
            return m.group(1).upper()
    last = None
    for m in _STATED.finditer(text):
        if m.group(1).isupper():
            last = m.group(1)
    if last is not None:
        return last
    m = _LONE.match(text)
    return m.group(1) if m else None


class ChoiceGrader(TaskGrader):
    name = "choice"

    def extract(self, response: str) -> str | None:
        block = answer_block(response)
        if block is not None:
            found = _letter(block[-TAIL_CHARS:])
            if found is not None:
                return found
        return _letter(response[-TAIL_CHARS:])

    def compare(self, reference: str, answer: str, timeout_s: int) -> Verdict:
        ref = reference.strip().strip("()").upper()
        return "correct" if answer.upper() == ref else "wrong"

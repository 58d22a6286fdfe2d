"""`exact`: normalised string equality — for answers that are names, words or codes. The answer is the boxed
one (ORZ format), else the rest of the line after the last "Answer:". Case, surrounding whitespace and `$`,
`\\text{…}` wrappers and a final period do not count.
"""

from __future__ import annotations

import re

from reward_server.extract import answer_block, last_boxed_content
from reward_server.graders.base import TaskGrader, Verdict

_ANSWER_LINE = re.compile(r"answer\s*(?:is|:)\s*([^\n]{1,200})", re.IGNORECASE)
_TEXT = re.compile(r"\\(?:text|textbf|mathrm)\s*\{([^{}]*)\}")


def normalise(text: str) -> str:
    s = _TEXT.sub(r"\1", text).replace("$", "")
    return " ".join(s.split()).strip().rstrip(".").strip().lower()


class ExactGrader(TaskGrader):
    name = "exact"

    def extract(self, response: str) -> str | None:
        block = answer_block(response)
        for text in ((block,) if block is not None else ()) + (response,):
            boxed = last_boxed_content(text, max_chars=200)
            if boxed is not None:
                return boxed
        found = None
        for m in _ANSWER_LINE.finditer(response[-2000:]):
            found = m.group(1)
        return found.strip() if found and found.strip() else None

    def compare(self, reference: str, answer: str, timeout_s: int) -> Verdict:
        return "correct" if normalise(answer) == normalise(reference) else "wrong"

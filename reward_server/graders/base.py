"""The grader interface: one small class per `task_type` (registered in `reward_server/graders/__init__.py`).

A grader does two things, split by where they run:
- `extract(response)` runs in the server process, on untrusted model text of up to `max_response_chars`: it
  must stay linear in the length (bounded scans, regexes without nested quantifiers, work on a tail) and
  never evaluate anything.
- `compare(reference, answer, timeout_s)` gets only the extracted answer. Graders whose comparison may run
  unbounded (sympy: math-verify) set `in_pool = True` and are run in a killable worker process with a
  wall-clock limit; cheap ones (string and number comparisons with capped inputs) run inline.
`screen(reference, answer)` may refuse, in the server process, an answer whose evaluation is known to be
hopelessly expensive (a power tower), so that it does not take a worker for the whole timeout.
"""

from __future__ import annotations

from typing import ClassVar, Literal

Verdict = Literal["correct", "wrong", "no_answer", "truncated", "rejected", "timeout", "error"]
VERDICTS: tuple[Verdict, ...] = ("correct", "wrong", "no_answer", "truncated", "rejected", "timeout", "error")


class TaskGrader:
    name: ClassVar[str]
    in_pool: ClassVar[bool] = False  # compare() runs in a killable worker process

    def extract(self, response: str) -> str | None:
        """The answer to grade, or None when the response gives none."""
        raise NotImplementedError

    def screen(self, reference: str, answer: str) -> Verdict | None:
        """A verdict reached without comparing (e.g. `rejected` for a hostile answer), or None to compare."""
        return None

    def compare(self, reference: str, answer: str, timeout_s: int) -> Verdict:
        """`correct` or `wrong` (`timeout` when the grader's own time limit hit)."""
        raise NotImplementedError

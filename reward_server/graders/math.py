"""`math`: ORZ's semantics — the last `\\boxed{…}` inside the last `<answer>…</answer>` (with `fallback_boxed`, else
the last `\\boxed{}` anywhere), compared with math-verify in a worker process; the reference is parsed once per
worker and cached.

The verdict is math-verify's own `verify(parse(gold), parse(answer))`, except that an exception about the
grader rather than the answer (a missing module, a file error, memory exhausted: `is_grader_fault`) is
raised to the caller, which answers `error`, instead of counting as a wrong answer.
"""

from __future__ import annotations

import functools
import re
from itertools import product

from math_verify import parse, verify
from math_verify.errors import TimeoutException

from reward_server.extract import extract_answer
from reward_server.graders.base import TaskGrader, Verdict
from reward_server.sandbox import is_grader_fault

GOLD_CACHE_SIZE = 4096  # parsed references kept per worker; a batch shares one reference across n_samples

# Answers whose evaluation sympy cannot finish (each hangs a worker for the whole timeout and can take
# 400-560 MB, measured on math-verify 0.9): numeric power towers, literal exponents, factorials and
# scientific exponents of 5+ digits. Patterns are anchored on single characters: no nested quantifiers.
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_TOWER = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\d+\s*\^|\*\*\s*\d+\s*\*\*|\^\s*\(\s*[^()]*\^")
_BIG_EXPONENT = re.compile(r"(?:\^|\*\*)\s*[{(]?\s*-?\d{5}")
_BIG_FACTORIAL = re.compile(r"\d{4}\s*!|[})]\s*!")
_BIG_SCIENTIFIC = re.compile(r"\d[eE][+-]?\d{4}")
_BIG_BINOMIAL = re.compile(r"\\binom\s*\{[^{}]*(?:\d{5}|\^)")
# A degenerate "1 1 1 …" run: math-verify's number regexes are super-linear on it, and a parse
# cut short by its alarm can fall back to a lone number — observed grading a boxed run of 490 ones as
# `correct` against "1" on a loaded machine. No real answer has 50 numbers in a row separated by spaces.
_NUMBER_RUN = re.compile(r"(?:\d+[ \t]+){49}\d")


def too_costly(answer: str) -> bool:
    """True for answers that only a hostile or degenerate model writes and sympy cannot evaluate in time."""
    if _BIG_EXPONENT.search(answer) or _BIG_FACTORIAL.search(answer) or _BIG_SCIENTIFIC.search(answer):
        return True
    if _BIG_BINOMIAL.search(answer) or _NUMBER_RUN.search(answer):
        return True
    # A tower of numbers (`9^{9^{9^9}}`); with a variable in it (`e^{x^2}`) sympy keeps it symbolic.
    return bool(_TOWER.search(answer)) and not re.search(r"[A-Za-z]", _LATEX_COMMAND.sub("", answer))


@functools.lru_cache(maxsize=GOLD_CACHE_SIZE)
def _parse_gold(reference: str, timeout_s: int) -> list:
    return _parse("$" + reference + "$", timeout_s)


def _parse(text: str, timeout_s: int) -> list:
    """math-verify's `parse`; an error about the text gives no parse (as math-verify's own default does)."""
    try:
        return parse(text, parsing_timeout=timeout_s, raise_on_error=True)
    except Exception as exc:
        if is_grader_fault(exc):
            raise
        return []


class MathGrader(TaskGrader):
    name = "math"
    in_pool = True

    def __init__(self, fallback_boxed: bool = False) -> None:
        self.fallback_boxed = fallback_boxed  # reward.math_fallback_boxed

    def extract(self, response: str) -> str | None:
        return extract_answer(response, fallback_boxed=self.fallback_boxed)

    def screen(self, reference: str, answer: str) -> Verdict | None:
        if answer == reference.strip():
            return "correct"  # identical strings: no need to spend a worker on them
        if too_costly(answer) and not too_costly(reference):
            return "rejected"
        return None

    def compare(self, reference: str, answer: str, timeout_s: int) -> Verdict:
        """`verify(parse(gold), parse(answer))`, with math-verify's SIGALRM timeouts of `timeout_s` per call.

        `verify` is called per (gold, prediction) pair, as math-verify itself iterates them, so that an
        exception scores that pair False while its TimeoutException becomes the `timeout` verdict instead
        of a silent False. Grader faults are raised (the worker answers `error`).
        """
        try:
            gold = _parse_gold(reference, timeout_s)
            pred = _parse("$" + answer + "$", timeout_s)
            for g, p in product(gold, pred):
                try:
                    if verify(g, p, timeout_seconds=timeout_s, raise_on_error=True):
                        return "correct"
                except Exception as exc:
                    if is_grader_fault(exc):
                        raise
            return "wrong"
        except TimeoutException:
            return "timeout"

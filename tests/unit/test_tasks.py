"""The tiny task's pretraining mix (services/tasks.py): worked solutions are right and long, guesses are short
and carry no information about the answer, and the mix follows `work_prob`."""

from __future__ import annotations

import math
import random
import re

from services.tasks import all_problems, answer_range, pretraining_response

BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def _value(text: str) -> int:
    """Left-to-right value of `7+5-3`, computed here digit by digit (independently of Problem.steps)."""
    total, sign, i = 0, 1, 0
    while i < len(text):
        if text[i] in "+-":
            sign = 1 if text[i] == "+" else -1
        else:
            total += sign * int(text[i])
        i += 1
    return total


def test_answer_range_is_the_familys_brute_force_extremes() -> None:
    for terms, operand in ((2, 9), (3, 9), (3, 5)):
        answers = [p.answer for p in all_problems(2, terms, operand)]
        assert answer_range(2, terms, operand) == (min(answers), max(answers))
    assert answer_range(2, 3, 9) == (-18, 27)


def test_worked_response_is_right_and_restates_the_problem() -> None:
    for p in all_problems(2, 3, 9)[::97]:
        r = p.response()
        assert p.answer == _value(p.text)
        steps = re.findall(r"(-?\d+)([+-])(\d)=(-?\d+)", r.split(". So")[0])
        assert len(steps) == len(p.ops)
        for a, op, b, c in steps:
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert f"So {p.text}={p.answer}." in r
        assert BOXED.findall(r) == [str(p.answer)] and r.endswith("</answer>")


def test_the_mix_follows_work_prob_and_guesses_are_uniform() -> None:
    lo, hi = answer_range(2, 3, 9)
    problems = all_problems(2, 3, 9)
    rng = random.Random(0)
    n, work_prob = 20_000, 0.15
    worked = right_guesses = 0
    seen: dict[int, int] = {}
    for i in range(n):
        p = problems[i % len(problems)]
        r = pretraining_response(p, rng, work_prob, lo, hi)
        if r == p.response():
            worked += 1
            continue
        assert r.startswith(" </think> <answer>") and "=" not in r  # a guess shows no work
        guess = int(BOXED.findall(r)[0])
        seen[guess] = seen.get(guess, 0) + 1
        right_guesses += guess == p.answer
    # Binomial: 4 standard deviations.
    assert abs(worked / n - work_prob) < 4 * math.sqrt(work_prob * (1 - work_prob) / n)
    guesses = n - worked
    assert set(seen) == set(range(lo, hi + 1))  # every value of the range, nothing outside it
    chance = 1 / (hi - lo + 1)
    assert abs(right_guesses / guesses - chance) < 4 * math.sqrt(chance * (1 - chance) / guesses)


"""The synthetic reasoning task of the tiny CPU run: short chains of single-digit additions and subtractions.

A problem is `7+5-3`. In ORZ's format a response either works it out,
`<think> 7+5=12, 12-3=9. So 7+5-3=9. </think> <answer>\\boxed{9}</answer>` (about 36 tokens),
or guesses, `<think> </think> <answer>\\boxed{14}</answer>` (about 12 tokens).

The base model is pretrained (learner/base_model.py) on a mix of the two: a fraction `work_prob` of the
traces work the problem out, step by step and right; the rest are a bare guess, a number drawn uniformly
from the family's answer range, so right only by chance (about 1 in 46). The base model therefore mostly
guesses and is mostly wrong, but it can compute. A 0/1 correctness reward, with no length term, pays for
working it out, so RL raises reward and response length together: ORZ's signature curves in miniature.
Problems are split into train and held-out sets by a stable hash, so the accuracy report is on problems
the learner never trained on.

Shared by the learner (prompt feed), the base-model builder and the evaluator, so it lives in services/.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

PROMPT_TEMPLATE = "User: Compute {problem}. Put the final answer in <answer>\\boxed{{}}</answer>.\nAssistant: <think>"
HELDOUT_MODULUS = 10  # one problem in ten is held out for evaluation


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]
    ops: tuple[str, ...]  # len(operands) - 1 of "+" / "-"

    @property
    def text(self) -> str:
        out = str(self.operands[0])
        for op, x in zip(self.ops, self.operands[1:]):
            out += f"{op}{x}"
        return out

    @property
    def task_id(self) -> str:
        return "arith:" + self.text

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(problem=self.text)

    def steps(self) -> list[tuple[int, str, int, int]]:
        """(left, op, right, result) for each step of the left-to-right evaluation."""
        acc = self.operands[0]
        out = []
        for op, x in zip(self.ops, self.operands[1:]):
            new = acc + x if op == "+" else acc - x
            out.append((acc, op, x, new))
            acc = new
        return out

    @property
    def answer(self) -> int:
        steps = self.steps()
        return steps[-1][3] if steps else self.operands[0]

    @property
    def heldout(self) -> bool:
        return zlib.crc32(self.text.encode()) % HELDOUT_MODULUS == 0

    def response(self) -> str:
        """The worked response: each step, then the whole problem restated with its value."""
        work = ", ".join(f"{a}{op}{b}={c}" for a, op, b, c in self.steps())
        return f" {work}. So {self.text}={self.answer}. </think> <answer>\\boxed{{{self.answer}}}</answer>"

    @staticmethod
    def guess_response(guess: int) -> str:
        """A bare guess: an empty think block and a boxed number."""
        return f" </think> <answer>\\boxed{{{guess}}}</answer>"


def all_problems(min_terms: int, max_terms: int, max_operand: int) -> list[Problem]:
    """Every problem of the family, in a fixed order."""
    out: list[Problem] = []

    def rec(operands: list[int], ops: list[str], terms: int) -> None:
        if len(operands) == terms:
            out.append(Problem(tuple(operands), tuple(ops)))
            return
        for x in range(max_operand + 1):
            for op in ("+", "-"):
                rec(operands + [x], ops + [op], terms)

    for terms in range(min_terms, max_terms + 1):
        for first in range(max_operand + 1):
            rec([first], [], terms)
    return out


def split(problems: list[Problem]) -> tuple[list[Problem], list[Problem]]:
    train = [p for p in problems if not p.heldout]
    heldout = [p for p in problems if p.heldout]
    return train, heldout


def answer_range(min_terms: int, max_terms: int, max_operand: int) -> tuple[int, int]:
    """The smallest and largest answer in the family: 0 minus every other operand at its largest, and
    every operand at its largest added."""
    return -(max_terms - 1) * max_operand, max_terms * max_operand


def pretraining_response(problem: Problem, rng: random.Random, work_prob: float, lo: int, hi: int) -> str:
    """One pretraining trace's response: worked out with probability `work_prob`, else a uniform guess in
    [lo, hi] (which carries no information about the answer, so it is right only by chance)."""
    if rng.random() < work_prob:
        return problem.response()
    return Problem.guess_response(rng.randint(lo, hi))


def train_stream(problems: list[Problem], seed: int) -> Iterator[Problem]:
    """An endless, seeded, epoch-shuffled stream of training problems (the feeder's dataset cursor)."""
    rng = random.Random(seed)
    order = list(problems)
    while True:
        rng.shuffle(order)
        yield from order


def eval_set(problems: list[Problem], size: int, seed: int) -> list[Problem]:
    _, heldout = split(problems)
    rng = random.Random(seed + 1)
    return rng.sample(heldout, min(size, len(heldout)))

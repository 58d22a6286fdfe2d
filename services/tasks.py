"""The synthetic reasoning task of the tiny CPU run: short chains of single-digit additions and subtractions.

A problem is `7+5-3`; a worked response in ORZ's format is
`<think> 7+5=12, 12-3=9 </think> <answer>\\boxed{9}</answer>`.

The base model is pretrained (learner/base_model.py) on *noisy* traces: the worked steps are always right,
but the final boxed answer is right only with probability `answer_correct_prob`; otherwise it is an
off-by-one slip or a random number. The resulting base model "knows" the computation but concludes
correctly only some of the time — the situation RL with a 0/1 correctness reward improves (the ORZ
setting in miniature). Problems are split into train and held-out sets by a stable hash, so the accuracy
report is on problems the learner never trained on.

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

    def response(self, final: int | None = None) -> str:
        """A worked response; `final` overrides the boxed answer (used for the noisy pretraining traces)."""
        work = ", ".join(f"{a}{op}{b}={c}" for a, op, b, c in self.steps())
        boxed = self.answer if final is None else final
        return f" {work} </think> <answer>\\boxed{{{boxed}}}</answer>"


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


def noisy_final(problem: Problem, rng: random.Random, correct_prob: float) -> int:
    """The base model's prior: right with `correct_prob`, else an off-by-one slip (2/3) or a random value."""
    u = rng.random()
    if u < correct_prob:
        return problem.answer
    if rng.random() < 2 / 3:
        return problem.answer + rng.choice((-1, 1))
    wrong = problem.answer
    while wrong == problem.answer:
        wrong = rng.randint(-9, 27)
    return wrong


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

"""Grader registry, keyed by `task_type`. Adding a grader: one file with a `TaskGrader` subclass, one line here."""

from __future__ import annotations

from reward_server.graders.base import VERDICTS, TaskGrader, Verdict
from reward_server.graders.choice import ChoiceGrader
from reward_server.graders.exact import ExactGrader
from reward_server.graders.math import MathGrader
from reward_server.graders.numeric import NumericGrader

REGISTRY: dict[str, TaskGrader] = {
    "math": MathGrader(),
    "choice": ChoiceGrader(),
    "numeric": NumericGrader(),
    "exact": ExactGrader(),
}

__all__ = ["REGISTRY", "VERDICTS", "TaskGrader", "Verdict"]


def run_compare(task_type: str, reference: str, answer: str, timeout_s: int) -> Verdict:
    """Entry point in a worker process (a module-level function, so the pool can name it)."""
    return REGISTRY[task_type].compare(reference, answer, timeout_s)


def grade_sync(task_type: str, response: str, reference: str, timeout_s: int) -> Verdict:
    """What the server does for one non-truncated item (extract → screen → compare), in this process. For
    offline use (tests, benchmarks' baselines): it runs math-verify here, guarded only by its own alarms."""
    grader = REGISTRY[task_type]
    answer = grader.extract(response)
    if answer is None:
        return "no_answer"
    return grader.screen(reference, answer) or grader.compare(reference, answer, timeout_s)


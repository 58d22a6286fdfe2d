"""Grader registry, keyed by `task_type`. Adding a grader: one file with a `TaskGrader` subclass, one line here."""

from __future__ import annotations

from reward_server.graders.base import VERDICTS, TaskGrader, Verdict
from reward_server.graders.choice import ChoiceGrader
from reward_server.graders.exact import ExactGrader
from reward_server.graders.math import MathGrader
from reward_server.graders.numeric import NumericGrader
from reward_server.sandbox import fault_watch

REGISTRY: dict[str, TaskGrader] = {
    "math": MathGrader(),
    "choice": ChoiceGrader(),
    "numeric": NumericGrader(),
    "exact": ExactGrader(),
}

__all__ = ["REGISTRY", "VERDICTS", "TaskGrader", "Verdict"]


def run_compare(task_type: str, reference: str, answer: str, timeout_s: int) -> tuple[Verdict, str | None]:
    """Entry point in a sealed worker process (a module-level function, so the pool can name it): the verdict,
    and for `error` what went wrong. A comparison during which the worker raised a grader fault, imported a
    module, opened a file or a socket (`sandbox.fault_watch`) is not trusted: its verdict is `error`."""
    with fault_watch() as faults:
        try:
            verdict = REGISTRY[task_type].compare(reference, answer, timeout_s)
        except Exception as exc:
            return "error", f"grader fault: {type(exc).__name__}: {exc}"[:300]
    if faults:
        return "error", "the sealed worker needed what a plain process would have had: " + "; ".join(faults)
    return verdict, None


def grade_sync(task_type: str, response: str, reference: str, timeout_s: int) -> Verdict:
    """What the server does for one non-truncated item (extract → screen → compare), in this process. For
    offline use (tests, benchmarks' baselines): it runs math-verify here, guarded only by its own alarms."""
    grader = REGISTRY[task_type]
    answer = grader.extract(response)
    if answer is None:
        return "no_answer"
    return grader.screen(reference, answer) or grader.compare(reference, answer, timeout_s)


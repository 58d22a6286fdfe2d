"""A fault of the grader is the verdict `error`, never `wrong`, and the generator's client grades those items
again instead of scoring them 0.

The fault is the real one the server had: `faulty_reward_server.py` is `orz reward-server` without the grading
modules loaded before the seal, so its sealed workers cannot import what sympy loads on first use. A healthy
`orz reward-server` process grades the same items correct.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import reward_server_process
from prometheus_client.parser import text_string_to_metric_families

from generator.reward_client import GradeItem, RewardClient, RewardClientError
from reward_server.graders import run_compare
from reward_server.sandbox import is_grader_fault

FAULTY = (str(Path(__file__).parents[1] / "support" / "faulty_reward_server.py"),)
# Answers right but written otherwise than the reference, that sympy decides with modules it loads lazily.
CASES = [("x^2+2x+1", "(x+1)^2"), ("\\frac{1}{2-\\sqrt{3}}", "2+\\sqrt{3}"), ("(2, 5]", "(2,5]")]


def _items() -> list[dict]:
    return [{"id": f"c{k}", "response": f"<answer>\\boxed{{{answer}}}</answer>", "reference": reference,
             "task_type": "math"} for k, (answer, reference) in enumerate(CASES)]


def _errors_counted(url: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        for s in family.samples:
            if s.name == "orz_reward_grades_total" and s.labels == {"grader": "math", "verdict": "error"}:
                return s.value
    raise AssertionError("orz_reward_grades_total{verdict=error} not exported")


@pytest.fixture(scope="module")
def faulty_server() -> Iterator[str]:
    with reward_server_process(grader_procs=1, command=FAULTY) as url:
        yield url


def test_a_fault_in_the_sealed_worker_is_error_not_wrong(faulty_server: str, reward_server: str) -> None:
    before = _errors_counted(faulty_server)
    results = httpx.post(f"{faulty_server}/v1/grade", json={"items": _items()}, timeout=60).json()["results"]
    assert [r["verdict"] for r in results] == ["error"] * len(CASES), results
    assert all(r["reward"] == 0.0 and "import" in r["detail"] for r in results), results
    assert _errors_counted(faulty_server) - before == len(CASES)
    healthy = httpx.post(f"{reward_server}/v1/grade", json={"items": _items()}, timeout=60).json()["results"]
    assert [(r["verdict"], r["detail"]) for r in healthy] == [("correct", None)] * len(CASES)


def _grade_items() -> list[GradeItem]:
    return [GradeItem(i["id"], i["response"], i["reference"], "math", False) for i in _items()] + [
        GradeItem("w", "<answer>\\boxed{7}</answer>", "3", "math", False)]


def test_the_client_grades_error_items_again_on_another_replica(faulty_server: str, reward_server: str) -> None:
    failures: list[tuple[str, str]] = []
    client = RewardClient(f"{faulty_server},{reward_server}", timeout_s=30, retry_s=60,
                          on_failure=lambda url, err: failures.append((url, err)))
    for _ in range(3):  # starting on either replica
        client._next = 0
        grades = client.grade(_grade_items())
        assert [g.verdict for g in grades] == ["correct"] * len(CASES) + ["wrong"]
    assert failures and all(url == faulty_server and "graded `error`" in err for url, err in failures)
    client.close()


def test_with_only_faulty_replicas_the_client_fails_after_retry_s_and_never_scores_0(faulty_server: str) -> None:
    attempts: list[float] = []
    client = RewardClient(faulty_server, timeout_s=30, retry_s=3.0, backoff_base_s=0.2, backoff_cap_s=1.0,
                          on_failure=lambda url, err: attempts.append(time.monotonic()))
    t0 = time.monotonic()
    with pytest.raises(RewardClientError, match=r"3 of 4 items got no grade .* graded `error`"):
        client.grade(_grade_items())
    assert 2.0 <= time.monotonic() - t0 <= 10.0
    assert len(attempts) >= 2  # retried with backoff, not given up on the first answer
    client.close()


def test_grader_faults_are_told_from_errors_about_the_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        try:
            raise OSError(24, "Too many open files")
        except OSError as exc:
            raise ValueError("wrapped") from exc  # math-verify re-raises as `raise e from e`
    except ValueError as exc:
        wrapped = exc
    assert is_grader_fault(wrapped) and is_grader_fault(MemoryError()) and is_grader_fault(ImportError("x"))
    assert not is_grader_fault(ValueError("no")) and not is_grader_fault(TypeError()) and \
        not is_grader_fault(RecursionError())

    import reward_server.graders.math as math_grader

    def broken_verify(*args, **kwargs):  # noqa: ANN002, ANN003
        raise MemoryError

    monkeypatch.setattr(math_grader, "verify", broken_verify)
    math_grader._parse_gold.cache_clear()
    verdict, detail = run_compare("math", "(x+1)^2", "x^2+2x+1", 5)
    assert verdict == "error" and "MemoryError" in detail

    def bad_answer(*args, **kwargs):  # noqa: ANN002, ANN003
        raise TypeError("unsupported operand")  # sympy refusing the answer: a wrong answer, not a fault

    monkeypatch.setattr(math_grader, "verify", bad_answer)
    assert run_compare("math", "(x+1)^2", "x^2+2x+1", 5) == ("wrong", None)


def test_a_memory_cap_that_leaves_a_worker_no_room_is_refused_at_start() -> None:
    # Under the cap math-verify catches the MemoryError and answers False: a correct answer would be `wrong`.
    with pytest.raises(RuntimeError, match=r"reward.worker_mem_mb=64 leaves a grading worker .* set it to at least"):
        with reward_server_process("--set", "reward.worker_mem_mb=64", grader_procs=1):
            pass

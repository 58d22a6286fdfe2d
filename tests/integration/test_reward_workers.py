"""`orz reward-server --workers 2 --grader-procs 1` for real: two uvicorn worker processes, each with its own
grading pool, behind one port; /metrics sums what every worker graded (prometheus_client multiprocess mode)."""

from __future__ import annotations

from pathlib import Path

import httpx
from conftest import reward_server_process
from prometheus_client.parser import text_string_to_metric_families


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        out += [int(p) for p in task.read_text().split()]
    return out


def _grades(text: str, verdict: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "orz_reward_grades_total" and s.labels == {"grader": "math", "verdict": verdict}:
                return s.value
    raise AssertionError("orz_reward_grades_total not exported")


def test_two_uvicorn_workers_share_the_port_and_the_metrics() -> None:
    with reward_server_process("--workers", "2", grader_procs=1) as url:
        pids = set()
        sent = 0
        while len(pids) < 2 and sent < 200:  # a fresh connection per request: the kernel spreads them over workers
            with httpx.Client(base_url=url, timeout=10) as c:
                resp = c.post("/v1/grade", json={"items": [
                    {"id": f"{sent}/0", "response": "<answer>\\boxed{\\frac{1}{2}}</answer>", "reference": "0.5"},
                    {"id": f"{sent}/1", "response": "<answer>\\boxed{3}</answer>", "reference": "0.5"}]})
                assert [r["verdict"] for r in resp.json()["results"]] == ["correct", "wrong"]
                sent += 1
                pids.add(c.get("/healthz").json().get("pid"))
        assert len(pids) == 2, pids  # both uvicorn workers answered
        assert all(len(_children(pid)) >= 1 for pid in pids)  # each with its own grading process
        text = httpx.get(f"{url}/metrics", timeout=5).text
        assert _grades(text, "correct") == sent and _grades(text, "wrong") == sent  # summed over both workers

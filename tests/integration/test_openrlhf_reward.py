"""`POST /v1/openrlhf` over real HTTP, on a real `orz reward-server` process: the exact JSON that OpenRLHF's remote
reward client (openrlhf/utils/remote_rm_utils.py, `--remote_rm_url`) posts, and what it reads back. Also the
limits, the bearer token, the metrics and the grader-fault answer, which are those of `/v1/grade`."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import reward_server_process
from prometheus_client.parser import text_string_to_metric_families

LIMITS = ("--set", "reward.max_items=8", "--set", "reward.max_response_chars=20000",
          "--set", "reward.max_reference_chars=100")
PROMPT = ("A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
          "... put the final answer within \\boxed{} inside <answer> </answer> tags.\nUser: What is 3/6?\n"
          "Assistant: <think>")
EOS = "<|endoftext|>"


def _openrlhf_post(url: str, data: dict, headers: dict | None = None) -> httpx.Response:
    """As OpenRLHF's request_api_wrapper does it: a JSON POST with a Content-Type header and nothing else."""
    body = json.dumps(data).encode()
    return httpx.post(url, content=body, headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=30)


def _metric(base: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name}{labels} not exported")


@pytest.fixture(scope="module")
def base() -> str:
    with reward_server_process(*LIMITS, "--set", "reward.grade_timeout_s=1.0", grader_procs=2) as url:
        yield url


def test_openrlhf_request_is_graded_as_sent(base: str) -> None:
    right = "1/2</think> <answer>\\boxed{\\frac{1}{2}}</answer>"
    wrong = "2</think> <answer>\\boxed{2}</answer>"
    no_block = "so \\boxed{0.5}</think> done"  # ORZ's format: a boxed answer outside <answer> earns nothing
    queries = [PROMPT + right + EOS,
               EOS * 3 + PROMPT + right,  # left padding decoded in front of the prompt (skip_special_tokens=False)
               PROMPT + wrong + EOS, PROMPT + no_block]
    # the prompt itself contains "\boxed{}": were it graded with the completion, row 3 would still be no_answer,
    # but a prompt holding the reference would be graded correct; the prompt is cut off first
    data = {"query": queries, "prompts": [PROMPT] * 4, "labels": ["0.5"] * 4}
    before = _metric(base, "orz_reward_grades_total", grader="math", verdict="correct")
    resp = _openrlhf_post(f"{base}/v1/openrlhf", data)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["rewards"] == [1.0, 1.0, 0.0, 0.0] and out["scores"] == out["rewards"]
    assert out["verdicts"] == ["correct", "correct", "wrong", "no_answer"]
    assert out["extra_logs"] == {"answer_found": [1.0, 1.0, 1.0, 0.0]}
    assert _metric(base, "orz_reward_grades_total", grader="math", verdict="correct") - before == 2

    leak = PROMPT.replace("What is 3/6?", "What is <answer>\\boxed{7}</answer>?")
    resp = _openrlhf_post(f"{base}/v1/openrlhf", {"query": [leak + "no idea"], "prompts": [leak], "labels": ["7"]})
    assert resp.status_code == 200 and resp.json()["verdicts"] == ["no_answer"]  # the prompt's box is not graded

    # newer OpenRLHF versions add fields; they are accepted and ignored. A grader is picked per request.
    resp = _openrlhf_post(f"{base}/v1/openrlhf?task_type=choice",
                          {"query": ["Q: pick one A: the answer is (B)"], "prompts": ["Q: pick one A:"],
                           "labels": ["B"], "datasources": ["mmlu"], "prompt_token_lens": [4]})
    assert resp.status_code == 200 and resp.json()["rewards"] == [1.0]


def test_malformed_and_oversize_openrlhf_requests(base: str) -> None:
    url = f"{base}/v1/openrlhf"
    resp = _openrlhf_post(url, {"query": [PROMPT + "x"], "prompts": ["another prompt"], "labels": ["1"]})
    assert resp.status_code == 422 and "rows [0] of 1: the query does not contain its prompt" in resp.json()["detail"]
    resp = _openrlhf_post(url, {"query": ["a", "b"], "prompts": ["a"], "labels": ["1", "2"]})
    assert resp.status_code == 422 and "same length (got 2, 1, 2)" in resp.text
    resp = _openrlhf_post(url, {"query": ["a"], "prompts": ["a"]})  # no --label_key given to OpenRLHF
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "labels"]
    resp = _openrlhf_post(url, {"query": ["a"], "prompts": ["a"], "labels": [None]})
    assert resp.status_code == 422
    resp = _openrlhf_post(url + "?task_type=code", {"query": ["a"], "prompts": ["a"], "labels": ["1"]})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["query", "task_type"]
    resp = _openrlhf_post(url, {"query": ["a"] * 9, "prompts": ["a"] * 9, "labels": ["1"] * 9})
    assert resp.status_code == 413 and "at most 8 items" in resp.json()["detail"][0]["msg"]
    resp = _openrlhf_post(url, {"query": ["x" * 20_001], "prompts": ["x"], "labels": ["1"]})
    assert resp.status_code == 413 and resp.json()["detail"][0]["loc"] == ["body", "query", 0]
    assert "xxxx" not in resp.text
    resp = _openrlhf_post(url, {"query": ["a"], "prompts": ["a"], "labels": ["1" * 101]})
    assert resp.status_code == 413
    assert httpx.get(f"{base}/healthz", timeout=5).json()["in_flight"] == 0


def test_openrlhf_route_requires_the_token() -> None:
    with reward_server_process("--set", "reward.token=s3cret", grader_procs=1) as url:
        data = {"query": [PROMPT + "x</think> <answer>\\boxed{0.5}</answer>"], "prompts": [PROMPT], "labels": ["1/2"]}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            resp = _openrlhf_post(f"{url}/v1/openrlhf", data, headers)
            assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
        resp = _openrlhf_post(f"{url}/v1/openrlhf", data, {"Authorization": "Bearer s3cret"})
        assert resp.status_code == 200 and resp.json()["rewards"] == [1.0]


def _busy_worker(url: str) -> int:
    pid = httpx.get(f"{url}/healthz", timeout=5).json()["pid"]
    children = set()
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        children.update(int(p) for p in path.read_text().split())
    deadline = time.monotonic() + 5
    while True:
        for child in children:
            try:
                if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "R":
                    return child
            except FileNotFoundError:
                pass
        assert time.monotonic() < deadline, "no grading worker became busy"
        time.sleep(0.02)


def test_a_grader_fault_is_503_never_a_zero_reward() -> None:
    """A grading worker killed mid-item: OpenRLHF gets 503 (its client retries the batch), not a reward of 0."""
    slow = "x</think> <answer>\\boxed{(x+1)^{1000}}</answer>"  # sympy works on it for seconds
    with reward_server_process("--set", "reward.grade_timeout_s=10", grader_procs=1) as url:
        outcome: dict = {}
        data = {"query": [PROMPT + slow], "prompts": [PROMPT], "labels": ["1"]}
        poster = threading.Thread(target=lambda: outcome.update(resp=_openrlhf_post(f"{url}/v1/openrlhf", data)))
        poster.start()
        worker = _busy_worker(url)
        time.sleep(0.2)
        os.kill(worker, signal.SIGKILL)
        poster.join(timeout=20)
        resp = outcome["resp"]
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
        assert "grader fault on rows [0] of 1" in resp.json()["detail"] and "retry" in resp.json()["detail"]
        again = {"query": [PROMPT + "x</think> <answer>\\boxed{1}</answer>"], "prompts": [PROMPT], "labels": ["1"]}
        resp = _openrlhf_post(f"{url}/v1/openrlhf", again)
        assert resp.status_code == 200 and resp.json()["rewards"] == [1.0]

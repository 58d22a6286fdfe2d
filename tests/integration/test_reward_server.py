"""The reward server over real HTTP: `orz reward-server` as its own process on a loopback port (as deployed: its
own imports, its sealed pool forked from it), httpx as the client.

Covers grading of known pairs, the outer kill of a hanging comparison while /healthz stays responsive, a
crashed worker, request limits, the bearer token and the Prometheus series.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import reward_server_process
from prometheus_client.parser import text_string_to_metric_families

from services.config import RewardConfig

TOWER = "<think>big</think> <answer>\\boxed{9^{9^{9^9}}}</answer>"  # sympy hangs on it (notes §2.4)
# Passes the cheap screen (a variable, a 4-digit exponent) but sympy needs far more than the 1 s limit on it.
SLOW = "<think>expand</think> <answer>\\boxed{(x+1)^{1000}}</answer>"
LIMITS = dict(max_items=8, max_response_chars=20_000, max_reference_chars=100)


def _state(pid: int) -> str:
    """The process state letter from /proc (R running, S sleeping, Z zombie), or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _live_children(pid: int) -> set[int]:
    pids: set[int] = set()
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        pids.update(int(p) for p in path.read_text().split())
    return {p for p in pids if _state(p) not in ("", "Z")}


def _workers(url: str) -> set[int]:
    """The grading processes of the server at `url` (the children of the process that answers /healthz)."""
    return _live_children(httpx.get(f"{url}/healthz", timeout=5).json()["pid"])


@contextmanager
def running_server(cfg: RewardConfig) -> Iterator[str]:
    """A real `orz reward-server` process with the settings of `cfg` that differ from the defaults."""
    defaults = RewardConfig().model_dump()
    sets = [f"reward.{key}={value}" for key, value in cfg.model_dump().items()
            if value != defaults[key] and key != "grader_procs"]
    with reward_server_process(*[arg for s in sets for arg in ("--set", s)], grader_procs=cfg.grader_procs) as url:
        yield url


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    # math-verify's own alarm defaults to 2 s here, so the 1 s pool kill is what ends a hanging comparison
    with running_server(RewardConfig(grader_procs=2, grade_timeout_s=1.0, **LIMITS)) as url:
        yield url


@pytest.fixture
def client(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=10.0) as c:
        yield c


def item(item_id: str, response: str, reference: str, truncated: bool = False) -> dict:
    return {"id": item_id, "response": response, "reference": reference, "task_type": "math", "truncated": truncated}


def grade(client: httpx.Client, *items: dict) -> list[dict]:
    resp = client.post("/v1/grade", json={"items": list(items)})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["id"] for r in results] == [i["id"] for i in items]
    return results


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name}{labels} not exported")


HALF = "<think>1/2 = 0.5</think> <answer>\\boxed{\\frac{1}{2}}</answer>"


@pytest.mark.parametrize(
    ("response", "reference", "verdict", "extracted"),
    [
        (HALF, "0.5", "correct", "\\frac{1}{2}"),
        (HALF, "\\dfrac{1}{2}", "correct", "\\frac{1}{2}"),
        (HALF, "3", "wrong", "\\frac{1}{2}"),
        ("<answer>\\boxed{\\dfrac{3}{4}}</answer>", "0.75", "correct", "\\dfrac{3}{4}"),
        ("<answer>\\boxed{x^2+3x}</answer>", "x(x+3)", "correct", "x^2+3x"),
        ("<answer>\\boxed{\\left(1, 2\\right)}</answer>", "(1,2)", "correct", "\\left(1, 2\\right)"),
        ("<answer>\\boxed{[1,2)}</answer>", "(1,2)", "wrong", "[1,2)"),
        ("<answer>\\boxed{106^\\circ}</answer>", "106", "correct", "106^\\circ"),
        ("<answer>\\boxed{12}</answer>", "12", "correct", "12"),
        ("First \\boxed{2}. Wait, actually <answer>\\boxed{3}</answer>", "3", "correct", "3"),
        ("<answer>\\boxed{\\text{banana}}</answer>", "7", "wrong", "\\text{banana}"),
        ("<think>so 12</think> <answer>12</answer>", "12", "no_answer", None),
        ("<answer>\\boxed{12}</answer>", "12", "truncated", "12"),
    ],
)
def test_known_pairs(client: httpx.Client, response: str, reference: str, verdict: str, extracted: str | None) -> None:
    [result] = grade(client, item("q/0", response, reference, truncated=verdict == "truncated"))
    assert result == {"id": "q/0", "reward": 1.0 if verdict == "correct" else 0.0,
                      "extracted": extracted, "verdict": verdict, "detail": None}


def test_batch_keeps_order_and_ids(client: httpx.Client) -> None:
    items = [item(f"t/{i}", f"<answer>\\boxed{{{i}}}</answer>", str(i if i % 2 else i + 1)) for i in range(8)]
    results = grade(client, *items)
    assert [r["verdict"] for r in results] == ["wrong", "correct"] * 4
    assert grade(client) == []


def test_injection_payload_is_not_executed(client: httpx.Client, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path('{target}').write_text('x')"
    results = grade(client, item("i/0", f"<answer>\\boxed{{{payload}}}</answer>", "1"),
                    item("i/1", f"<answer>\\boxed{{2+{payload}}}</answer>", "1"),
                    item("i/2", f"<answer>\\boxed{{\\text{{{payload}}}}}</answer>", "1"))
    assert [r["verdict"] for r in results] == ["wrong", "wrong", "wrong"]
    assert not target.exists()


def test_hanging_item_times_out_while_healthz_answers(client: httpx.Client, server_url: str) -> None:
    restarts_before = metric(client, "orz_reward_worker_restarts_total")
    timeouts_before = metric(client, "orz_reward_timeouts_total")
    outcome: dict = {}

    def post() -> None:
        t0 = time.perf_counter()
        with httpx.Client(base_url=server_url, timeout=30.0) as c:  # both workers stuck in sympy
            outcome["results"] = grade(c, item("h/0", SLOW, "(x+1)^{1001}"), item("h/1", SLOW, "(x+1)^{999}"))
        outcome["elapsed"] = time.perf_counter() - t0

    poster = threading.Thread(target=post)
    poster.start()
    health_latencies, in_flight_seen = [], 0
    while poster.is_alive():
        t0 = time.perf_counter()
        resp = client.get("/healthz", timeout=2.0)
        health_latencies.append(time.perf_counter() - t0)
        assert resp.status_code == 200 and resp.json()["status"] == "ok"
        in_flight_seen = max(in_flight_seen, resp.json()["in_flight"])
        time.sleep(0.05)
    poster.join()

    assert in_flight_seen == 2, "/healthz was never polled while both workers were busy"
    assert len(health_latencies) >= 5 and max(health_latencies) < 0.1, health_latencies
    assert [r["verdict"] for r in outcome["results"]] == ["timeout", "timeout"]
    assert all(r["reward"] == 0.0 and r["extracted"] == "(x+1)^{1000}" for r in outcome["results"])
    assert 1.0 <= outcome["elapsed"] < 4.0
    assert metric(client, "orz_reward_worker_restarts_total") - restarts_before == 2
    assert metric(client, "orz_reward_timeouts_total") - timeouts_before == 2

    # the killed workers were replaced: the next items grade at once
    t0 = time.perf_counter()
    results = grade(client, item("n/0", HALF, "0.5"), item("n/1", HALF, "0.25"))
    assert [r["verdict"] for r in results] == ["correct", "wrong"]
    assert time.perf_counter() - t0 < 1.0


def test_crashed_worker_gives_error_and_server_stays_up() -> None:
    with running_server(RewardConfig(grader_procs=1, grade_timeout_s=10.0, **LIMITS)) as url, httpx.Client(
        base_url=url, timeout=30.0
    ) as c:
        [worker] = _workers(url)
        # a worker killed while grading: that item answers `error`, pebble forks a replacement
        outcome: dict = {}
        poster = threading.Thread(target=lambda: outcome.update(results=grade(c, item("c/0", SLOW, "1"))))
        poster.start()
        deadline = time.monotonic() + 5
        while _state(worker) != "R":  # busy in sympy, not waiting for a task
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.2)
        os.kill(worker, signal.SIGKILL)
        poster.join(timeout=10)
        assert outcome["results"][0]["verdict"] == "error" and outcome["results"][0]["reward"] == 0.0
        assert "grading worker died" in outcome["results"][0]["detail"]
        assert metric(c, "orz_reward_worker_restarts_total") == 1
        assert grade(c, item("c/1", HALF, "0.5"))[0]["verdict"] == "correct"

        # an idle worker killed (the OOM killer's choice) makes pebble give the pool up; it is rebuilt
        [worker] = _workers(url)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _state(worker) != "":  # reaped: pebble has seen it die, in the pass that gives the pool up
            assert time.monotonic() < deadline, "pebble never reaped the killed worker"
            time.sleep(0.02)
        assert grade(c, item("c/2", HALF, "0.5"))[0]["verdict"] == "correct"
        assert metric(c, "orz_reward_pool_restarts_total") == 1
        assert c.get("/healthz").json()["status"] == "ok"


def test_oversize_requests_are_refused(client: httpx.Client) -> None:
    long_response = item("o/0", "x" * (LIMITS["max_response_chars"] + 1), "1")
    resp = client.post("/v1/grade", json={"items": [long_response]})
    assert resp.status_code == 413
    [error] = resp.json()["detail"]
    assert error["loc"] == ["body", "items", 0, "response"]
    assert "at most 20000 characters" in error["msg"]
    assert "xxxx" not in resp.text  # the offending input is not echoed back

    too_many = [item(f"o/{i}", "\\boxed{1}", "1") for i in range(LIMITS["max_items"] + 1)]
    resp = client.post("/v1/grade", json={"items": too_many})
    assert resp.status_code == 413
    assert "at most 8 items" in resp.json()["detail"][0]["msg"]

    resp = client.post("/v1/grade", json={"items": [item("o/1", "\\boxed{1}", "1" * 101)]})
    assert resp.status_code == 413 and resp.json()["detail"][0]["loc"][-1] == "reference"

    huge = b'{"items": [' + b" " * 2_000_000 + b"]}"  # no valid request is this long: refused unread
    resp = client.post("/v1/grade", content=huge, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and "over the limit" in resp.json()["detail"]


def test_malformed_requests_are_422(client: httpx.Client) -> None:
    resp = client.post("/v1/grade", json={"items": [{**item("m/0", "\\boxed{1}", "1"), "task_type": "code"}]})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"][-1] == "task_type"
    resp = client.post("/v1/grade", json={"items": [{"id": "m/1", "response": "\\boxed{1}"}]})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"][-1] == "reference"
    resp = client.post("/v1/grade", content=b"not json", headers={"Content-Type": "application/json"})
    assert resp.status_code == 422


def test_bearer_token() -> None:
    with running_server(RewardConfig(grader_procs=1, token="s3cret", **LIMITS)) as url, httpx.Client(
        base_url=url, timeout=10.0
    ) as c:
        body = {"items": [item("a/0", HALF, "0.5")]}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            resp = c.post("/v1/grade", json=body, headers=headers)
            assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
        resp = c.post("/v1/grade", json=body, headers={"Authorization": "Bearer s3cret"})
        assert resp.status_code == 200 and resp.json()["results"][0]["verdict"] == "correct"
        assert c.get("/healthz").status_code == 200


def test_metrics_count_verdicts(client: httpx.Client) -> None:
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    for grader in ("math", "choice", "numeric", "exact"):
        for verdict in ("correct", "wrong", "no_answer", "truncated", "rejected", "timeout", "error"):
            assert f'orz_reward_grades_total{{grader="{grader}",verdict="{verdict}"}}' in resp.text
    for name in ("orz_reward_grade_latency_seconds_bucket", "orz_reward_in_flight", "orz_reward_worker_restarts_total"):
        assert name in resp.text

    before = {v: metric(client, "orz_reward_grades_total", grader="math", verdict=v)
              for v in ("correct", "wrong", "no_answer")}
    count_before = metric(client, "orz_reward_grade_latency_seconds_count", grader="math")
    grade(client, item("g/0", HALF, "0.5"), item("g/1", HALF, "0.5"), item("g/2", HALF, "2"), item("g/3", "none", "1"))
    after = {v: metric(client, "orz_reward_grades_total", grader="math", verdict=v) for v in before}
    assert {v: after[v] - before[v] for v in before} == {"correct": 2, "wrong": 1, "no_answer": 1}
    assert metric(client, "orz_reward_grade_latency_seconds_count", grader="math") - count_before == 4
    assert metric(client, "orz_reward_in_flight") == 0


def _deep(n: int) -> str:
    return "{" * n + "1" + "}" * n


HOSTILE = {  # name: (task_type, response, reference, verdicts allowed)
    "power_tower": ("math", "<answer>\\boxed{9^{9^{9^9}}}</answer>", "1", {"rejected"}),
    "tower_of_twos": ("math", "<answer>\\boxed{2^{2^{2^{2^{2^2}}}}}</answer>", "4", {"rejected"}),
    "huge_factorial": ("math", "<answer>\\boxed{100000!}</answer>", "1", {"rejected"}),
    "factorial_of_power": ("math", "<answer>\\boxed{(10^{10})!}</answer>", "1", {"rejected"}),
    "huge_binomial": ("math", "<answer>\\boxed{\\binom{10^9}{10^8}}</answer>", "1", {"rejected"}),
    "huge_polynomial": ("math", "<answer>\\boxed{(x+1)^{100000}}</answer>", "(x+1)^2", {"rejected"}),
    "braces_10k_deep": ("math", "<answer>\\boxed{" + _deep(10_000) + "}</answer>", "1", {"no_answer"}),
    "parens_400_deep": ("math", "<answer>\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}</answer>", "2",
                        {"wrong", "timeout"}),
    "one_megabyte": ("math", "blah " * 209_000 + "<answer>\\boxed{42}</answer>", "42", {"correct"}),
    "one_megabyte_no_answer": ("math", "x" * 1_048_000, "42", {"no_answer"}),
    # refused before math-verify: a slow parse of it once fell back to a lone "1" and graded it correct
    "ones_run_in_box": ("math", "<answer>\\boxed{" + "1 " * 490 + "}</answer>", "1", {"rejected"}),
    "ones_run_49": ("math", "<answer>\\boxed{" + "1 " * 49 + "}</answer>", "2", {"wrong", "timeout"}),
    "ones_run_400k": ("math", "1 " * 400_000, "1", {"no_answer"}),
    "unclosed_boxes": ("math", "\\boxed{" * 100_000 + "1", "1", {"no_answer"}),
    "many_boxes": ("math", "<answer>" + "\\boxed{1}" * 100_000 + "</answer>", "1", {"correct"}),
    "many_boxes_no_block": ("math", "\\boxed{1}" * 100_000, "1", {"no_answer"}),  # ORZ: no answer block, 0
    "digits_100k": ("math", "<answer>\\boxed{" + "9" * 100_000 + "}</answer>", "1", {"no_answer"}),
    "import_payload": ("math", "<answer>\\boxed{__import__('os').system('touch /tmp/orz-pwned')}</answer>", "1",
                       {"wrong"}),
    "numeric_digits_1mb": ("numeric", "9" * 1_000_000, "9", {"wrong"}),
    "numeric_commas": ("numeric", "1," * 400_000 + "1", "1", {"wrong"}),
    "choice_1mb": ("choice", "answer is " * 100_000 + "(B)", "B", {"correct"}),
}


@pytest.fixture(scope="module")
def default_limits_url() -> Iterator[str]:
    with running_server(RewardConfig(grader_procs=2, grade_timeout_s=1.0)) as url:
        yield url


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_output_is_answered_in_time(name: str, default_limits_url: str) -> None:
    task_type, response, reference, allowed = HOSTILE[name]
    with httpx.Client(base_url=default_limits_url, timeout=30.0) as c:
        t0 = time.perf_counter()
        resp = c.post("/v1/grade", json={"items": [{"id": name, "response": response, "reference": reference,
                                                    "task_type": task_type}]})
        elapsed = time.perf_counter() - t0
        assert resp.status_code == 200, resp.text[:300]
        [result] = resp.json()["results"]
        assert result["verdict"] in allowed, result
        assert elapsed < 1.0 + 1.0, f"{name} took {elapsed:.2f} s"  # the 1 s limit plus a margin
        health = c.get("/healthz", timeout=2.0)
        assert health.status_code == 200 and health.json()["in_flight"] == 0
        assert grade(c, item("after", HALF, "0.5"))[0]["verdict"] == "correct"
    assert not Path("/tmp/orz-pwned").exists()


def test_orz_answer_format_and_the_fallback(client: httpx.Client) -> None:
    """ORZ's reward format by default: a boxed answer outside a closed <answer> block earns nothing. A server
    started with reward.math_fallback_boxed grades the last boxed anywhere."""
    in_think = "<think>so x = \\boxed{2}</think> I am done"
    no_box_in_block = "<think>\\boxed{2}</think> <answer>2</answer>"
    orz = grade(client, item("f/0", in_think, "2"), item("f/1", no_box_in_block, "2"),
                item("f/2", "<think>x</think> <answer>\\boxed{2}</answer>", "2"))
    assert [(r["verdict"], r["reward"]) for r in orz] == [("no_answer", 0.0), ("no_answer", 0.0), ("correct", 1.0)]
    with running_server(RewardConfig(grader_procs=1, math_fallback_boxed=True)) as url, \
            httpx.Client(base_url=url, timeout=10.0) as other:
        fallback = grade(other, item("f/0", in_think, "2"), item("f/1", no_box_in_block, "2"))
    assert [(r["verdict"], r["extracted"]) for r in fallback] == [("correct", "2"), ("correct", "2")]

"""The generator's reward client against real servers: a hung replica (accepts, never answers) is cut off by
the request timeout and marked down, and grading goes on through the live one; with every replica down it
backs off (exponential, jittered, capped) and gives up after `retry_s` with a clear error, never returning a
grade it did not get; a refusal (4xx) is not retried."""

from __future__ import annotations

import socket
import time

import pytest
from test_reward_server import running_server

from generator.reward_client import GradeItem, RewardClient, RewardClientError, _jittered
from services.config import RewardConfig
from services.metrics import free_port

HALF = "so <answer>\\boxed{\\frac{1}{2}}</answer>"


def _items(n: int) -> list[GradeItem]:
    return [GradeItem(f"i{k}", HALF, "0.5" if k % 2 == 0 else "3", "math", False) for k in range(n)]


def test_a_hung_replica_is_bypassed() -> None:
    with socket.socket() as hung, running_server(RewardConfig(grader_procs=1)) as live:
        hung.bind(("127.0.0.1", 0))
        hung.listen()  # the kernel accepts connections; nothing ever answers
        hung_url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        failures: list[tuple[str, str]] = []
        # marked down for 30-60 s after its first failure: the live replica serves every later batch, however
        # long they take on this machine
        client = RewardClient(f"{hung_url},{live}", timeout_s=1.0, retry_s=30, backoff_base_s=60,
                              on_failure=lambda url, err: failures.append((url, err)))
        t0 = time.monotonic()
        for _ in range(6):
            grades = client.grade(_items(4))
            assert [g.verdict for g in grades] == ["correct", "wrong", "correct", "wrong"]
        # the hung replica cost one timeout, then stayed marked down while the live one served
        assert len(failures) == 1 and all(url == hung_url and "ReadTimeout" in err for url, err in failures)
        assert time.monotonic() - t0 < 1.0 * len(failures) + 5
        client.close()


def test_every_replica_down_backs_off_then_fails() -> None:
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]  # nothing listens: connections are refused
    attempts: list[float] = []
    client = RewardClient(",".join(urls), timeout_s=1.0, retry_s=4.0, backoff_base_s=0.2, backoff_cap_s=1.0,
                          on_failure=lambda url, err: attempts.append(time.monotonic()))
    t0 = time.monotonic()
    with pytest.raises(RewardClientError, match="no reward server of .* answered for 4 s"):
        client.grade(_items(2))
    elapsed = time.monotonic() - t0
    assert 3.0 <= elapsed <= 6.0
    # not a busy loop: with a 0.2 s base doubling to a 1 s cap, per replica, a handful of attempts in 4 s
    assert 4 <= len(attempts) <= 16, len(attempts)
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert max(gaps) >= 0.4  # the waits grew
    client.close()


def test_jitter_stays_within_half_and_full_delay() -> None:
    import random

    rng = random.Random(0)
    draws = [_jittered(2.0, rng) for _ in range(1000)]
    assert 1.0 <= min(draws) and max(draws) <= 2.0 and max(draws) - min(draws) > 0.8


def test_a_refusal_is_not_retried() -> None:
    with running_server(RewardConfig(grader_procs=1, token="secret")) as live:
        client = RewardClient(live, timeout_s=5.0, token="wrong", retry_s=30)
        t0 = time.monotonic()
        with pytest.raises(RewardClientError, match="refused the batch: 401"):
            client.grade(_items(1))
        assert time.monotonic() - t0 < 2.0
        client.close()

"""HTTP client of the reward server's `POST /v1/grade` (the generator's only view of grading).

`reward.url` may list several replicas, comma-separated. Each call goes to the next replica that is not
marked down; a replica that fails (refused connection, a 5xx, or no answer within `request_timeout_s`:
a hung replica) is marked down for a jittered, doubling time and the call moves on to the next. When every
replica is down the client backs off (exponential, capped, with jitter, so a fleet of generators does not
come back in lock step) and keeps trying for `retry_s` in all; only then does it raise. It never returns
a partial or made-up grade: the generator publishes nothing ungraded.

A grade with the verdict `error` is a fault of that replica's grader (a broken worker, a module it could not
load), not a judgement of the answer, and is treated like a failed call: the replica is marked down and
those items, only those, are graded again by the next one, within the same `retry_s`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

log = logging.getLogger("orz.generator.reward")


@dataclass(frozen=True)
class GradeItem:
    id: str
    response: str
    reference: str
    task_type: str
    truncated: bool


@dataclass(frozen=True)
class Grade:
    id: str
    reward: float
    extracted: str | None
    verdict: str
    detail: str | None = None


ERROR = "error"  # the reward server's verdict for a fault of its own grader


class RewardClientError(RuntimeError):
    pass


def _jittered(seconds: float, rng: random.Random) -> float:
    """Equal jitter: half the delay, plus up to the other half at random (AWS architecture blog's variant)."""
    return seconds / 2 + rng.uniform(0, seconds / 2)


class RewardClient:
    def __init__(self, base_url: str, timeout_s: float, token: str | None = None, retry_s: float = 300.0,
                 backoff_base_s: float = 0.5, backoff_cap_s: float = 10.0,
                 on_failure: Callable[[str, str], None] | None = None) -> None:
        """`base_url`: one URL or several comma-separated replicas. `on_failure(url, error)` is called on every
        failed attempt (the generator counts them in a metric)."""
        self.urls = [u.strip().rstrip("/") for u in base_url.split(",") if u.strip()]
        if not self.urls:
            raise ValueError("reward.url is empty")
        self.base_url = ",".join(self.urls)
        self.timeout_s, self.retry_s = timeout_s, retry_s
        self.backoff_base_s, self.backoff_cap_s = backoff_base_s, backoff_cap_s
        self.on_failure = on_failure
        self._rng = random.Random()
        self._next = self._rng.randrange(len(self.urls))  # generators start on different replicas
        self._down_until = dict.fromkeys(self.urls, 0.0)
        self._failures = dict.fromkeys(self.urls, 0)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)), headers=headers)

    def _pick(self) -> str:
        """The next replica in turn that is not marked down; if all are, the one that comes back first."""
        now = time.monotonic()
        n = len(self.urls)
        for k in range(n):
            url = self.urls[(self._next + k) % n]
            if self._down_until[url] <= now:
                self._next = (self._next + k + 1) % n
                return url
        return min(self.urls, key=self._down_until.__getitem__)

    def _mark_down(self, url: str) -> None:
        self._failures[url] += 1
        delay = min(self.backoff_cap_s, self.backoff_base_s * 2 ** (self._failures[url] - 1))
        self._down_until[url] = time.monotonic() + _jittered(delay, self._rng)

    def _attempt(self, url: str, body: dict, items: list[GradeItem]) -> list[Grade] | str:
        """One POST; the grades, or why it failed in a way worth retrying. Raises on a refusal (4xx)."""
        try:
            resp = self._http.post(f"{url}/v1/grade", json=body)
        except httpx.TransportError as exc:  # refused, reset, or timed out (a hung replica)
            return f"{type(exc).__name__}: {exc}"
        if resp.status_code >= 500:
            return f"HTTP {resp.status_code}"
        if resp.status_code != 200:
            raise RewardClientError(f"reward server {url} refused the batch: {resp.status_code} {resp.text[:300]}")
        results = resp.json()["results"]
        by_id = {r["id"]: r for r in results}
        missing = [item.id for item in items if item.id not in by_id]
        if missing:
            raise RewardClientError(f"reward server {url} left out {len(missing)} items")
        return [Grade(i.id, float(by_id[i.id]["reward"]), by_id[i.id].get("extracted"), by_id[i.id]["verdict"],
                      by_id[i.id].get("detail")) for i in items]

    def grade(self, items: list[GradeItem]) -> list[Grade]:
        """Grades a batch, going round the replicas and backing off while none answers; items graded `error`
        are graded again elsewhere. Fails loudly on 4xx, and after `retry_s` without a grade for every item."""
        deadline = time.monotonic() + self.retry_s
        done: dict[str, Grade] = {}
        pending = items
        attempt = 0
        last_error = ""
        answered = False
        while True:
            url = self._pick()
            wait = self._down_until[url] - time.monotonic()
            if wait > 0:  # every replica is down: back off until the first one may be tried again
                if time.monotonic() + wait > deadline:
                    break
                time.sleep(wait)
            attempt += 1
            result = self._attempt(url, {"items": [item.__dict__ for item in pending]}, pending)
            if not isinstance(result, str):
                answered = True
                faulty = [g for g in result if g.verdict == ERROR]
                done.update((g.id, g) for g in result if g.verdict != ERROR)
                pending = [item for item in pending if item.id not in done]
                if not faulty:
                    if self._failures[url]:
                        log.info("reward server %s answers again", url)
                    self._failures[url] = 0
                    return [done[item.id] for item in items]
                result = f"{len(faulty)} of {len(result)} items graded `error` ({faulty[0].detail or 'no detail'})"
            last_error = result
            self._mark_down(url)
            if self.on_failure is not None:
                self.on_failure(url, result)
            log.warning("grading attempt %d at %s failed (%s); retrying for up to %.0f s more", attempt, url, result,
                        max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                break
        if answered:
            raise RewardClientError(f"{len(pending)} of {len(items)} items got no grade from {self.base_url} in "
                                    f"{self.retry_s:.0f} s ({attempt} attempts; last: {last_error})")
        raise RewardClientError(f"no reward server of {self.base_url} answered for {self.retry_s:.0f} s "
                                f"({attempt} attempts; last: {last_error})")

    def close(self) -> None:
        self._http.close()

"""HTTP client of the reward server's `POST /v1/grade` (the generator's only view of grading)."""

from __future__ import annotations

import logging
import time
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


class RewardClientError(RuntimeError):
    pass


class RewardClient:
    def __init__(self, base_url: str, timeout_s: float, token: str | None = None, retries: int = 3) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self._http = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout_s, connect=5.0),
                                  headers=headers)

    def grade(self, items: list[GradeItem]) -> list[Grade]:
        """Grades a batch; retries transport errors and 5xx with backoff, fails loudly on 4xx."""
        body = {"items": [item.__dict__ for item in items]}
        delay = 0.5
        for attempt in range(1, self.retries + 1):
            try:
                resp = self._http.post("/v1/grade", json=body)
            except httpx.TransportError as exc:
                err: str = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 200:
                    results = resp.json()["results"]
                    by_id = {r["id"]: r for r in results}
                    missing = [item.id for item in items if item.id not in by_id]
                    if missing:
                        raise RewardClientError(f"reward server left out {len(missing)} items")
                    return [Grade(i.id, float(by_id[i.id]["reward"]), by_id[i.id].get("extracted"),
                                  by_id[i.id]["verdict"]) for i in items]
                if resp.status_code < 500:
                    raise RewardClientError(f"reward server refused the batch: {resp.status_code} {resp.text[:300]}")
                err = f"HTTP {resp.status_code}"
            log.warning("grading attempt %d/%d failed: %s", attempt, self.retries, err)
            if attempt < self.retries:
                time.sleep(delay)
                delay *= 2
        raise RewardClientError(f"reward server at {self.base_url} unavailable after {self.retries} attempts")

    def close(self) -> None:
        self._http.close()

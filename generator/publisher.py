"""The generator's publisher: grades finished groups on a background thread while the engine keeps stepping,
publishes them (a `TrajectoryGroup`, or an `EvalResult` for an eval prompt), then acks their prompts; and the
leases on every prompt the generator holds, renewed with each heartbeat so peers reclaim (`claim_idle_ms`)
only the prompts of a generator that stopped, never those of one that is merely slow.

Grading is an HTTP round trip per batch of finished groups; the engine would idle through it. At most
`MAX_PUBLISH_BACKLOG` batches wait for grading before the engine waits too (backpressure on a slow or
absent reward server), heartbeating meanwhile so its leases stay alive.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from generator.engine import Completion
from generator.reward_client import GradeItem, RewardClientError
from services.protocol import EvalResult, PromptTask, TrajectoryGroup
from services.publish import publish_and_ack
from services.queue import StreamQueue

MAX_PUBLISH_BACKLOG = 8  # engine steps' worth of finished groups waiting for grading before the engine waits


@dataclass
class InFlight:
    entry_id: str  # the prompt's stream entry, acked once its group is published
    task: PromptTask
    version_first: int  # weights version when the request entered the engine (its first token)
    submitted: float


class Publisher:
    def __init__(self, generator_id: str, prompts: StreamQueue[PromptTask], trajectories: StreamQueue[TrajectoryGroup],
                 evals: StreamQueue[EvalResult], reward, metrics, wait_s: float) -> None:
        self.id = generator_id
        self.prompts, self.trajectories, self.evals = prompts, trajectories, evals
        self.reward, self.metrics, self.wait_s = reward, metrics, wait_s
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="publish")
        self._publishing: deque[Future] = deque()
        # Prompt entries taken and not yet acked or rejected (in the engine, waiting, or being graded): the
        # leases `renew` keeps alive. The publishing thread removes what it acks.
        self._held: set[str] = set()
        self._held_lock = threading.Lock()

    # -- leases ---------------------------------------------------------------------------------------------
    def hold(self, entry_ids: Iterable[str]) -> None:
        with self._held_lock:
            self._held.update(entry_ids)

    def release(self, entry_ids: Iterable[str]) -> None:
        with self._held_lock:
            self._held.difference_update(entry_ids)

    def renew(self) -> None:
        """Resets the idle time of the prompts this generator still holds (XCLAIM JUSTID to itself)."""
        with self._held_lock:
            held = set(self._held)
        self.prompts.renew(self.id, held)

    # -- publishing -----------------------------------------------------------------------------------------
    def submit(self, jobs: list[tuple[InFlight, list[Completion]]], version_last: int,
               heartbeat: Callable[[], None]) -> None:
        """Queues finished groups for grading; waits (heartbeating) while the backlog is full."""
        while len(self._publishing) >= MAX_PUBLISH_BACKLOG:  # grading fell behind: wait for the oldest batch
            try:
                self._publishing[0].result(timeout=self.wait_s)
            except FutureTimeout:  # still alive, only waiting (a reward-server outage): keep the leases
                heartbeat()
                continue
            self._publishing.popleft()
        self._publishing.append(self._pool.submit(self._publish, jobs, version_last))

    def collect(self, block: bool = False) -> None:
        """Surfaces the publishing thread's errors (a failed grade or Redis write stops the generator; its
        prompts stay pending and a peer reclaims them)."""
        while self._publishing and (block or self._publishing[0].done()):
            self._publishing.popleft().result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)

    def _publish(self, jobs: list[tuple[InFlight, list[Completion]]], version_last: int) -> None:
        """Grades the groups that finished in one engine step, publishes them, then acks their prompts."""
        items = [GradeItem(f"{ji}/{si}", c.text, job.task.reference, job.task.task_type, c.finish_reason == "length")
                 for ji, (job, comps) in enumerate(jobs) for si, c in enumerate(comps)]
        t0 = time.time()
        try:
            grades = self.reward.grade(items)
        except RewardClientError:
            self.metrics.reward_errors.inc()
            raise
        grade_s = time.time() - t0
        self.metrics.reward_latency.observe(grade_s)
        by_id = {g.id: g for g in grades}
        groups, evals = [], []
        for ji, (job, comps) in enumerate(jobs):
            if job.task.eval_round >= 0:  # an eval prompt: its rewards are counted, never trained on
                evals.append(EvalResult(
                    task_id=job.task.task_id, eval_round=job.task.eval_round,
                    rewards=tuple(by_id[f"{ji}/{si}"].reward for si in range(len(comps))),
                    policy_version=job.version_first, policy_version_last=version_last, generator_id=self.id,
                    truncated=sum(c.finish_reason == "length" for c in comps)))
                continue
            # Texts only where the learner asked for them (its sample of completions to log): it trains on ids.
            marks = [by_id[f"{ji}/{si}"] for si in range(len(comps))]
            group = TrajectoryGroup.build(
                job.task.task_id, job.task.prompt_ids, [c.token_ids for c in comps], [c.logprobs for c in comps],
                [m.reward for m in marks], [c.finish_reason for c in comps],
                [c.text if job.task.with_texts else "" for c in comps], [m.verdict for m in marks],
                policy_version=job.version_first, generator_id=self.id, policy_version_last=version_last,
                timings={"generate_s": time.time() - job.submitted, "grade_s": grade_s, "published_at": time.time()},
            )
            groups.append(group)
        # The results in one round trip, then the acks of their prompts: a crash in between leaves the prompts
        # pending, and a live peer reclaims them (docs/architecture.md, "Delivery").
        publish_and_ack([(self.trajectories, groups), (self.evals, evals)], self.prompts,
                        [job.entry_id for job, _ in jobs])
        self.release([job.entry_id for job, _ in jobs])
        self.metrics.groups.inc(len(jobs))

"""Intake: what the learner lets into a batch, and what it knows about every task it fed.

`Intake.collect` reads trajectory groups until `batch_prompts` fresh ones are in hand (docs/architecture.md,
"One step"). On the way each group is checked against what was fed (`invalid_group`: dead-lettered, its task
fed again), a duplicate of a consumed task is dropped (a reclaimed prompt can be generated twice), and a
group more than `max_staleness` versions old is dropped and counted. Once a second it also asks whether
Redis restarted (`watch_redis`) and, if so, feeds again the prompts found in neither stream.

`consumed` is every task trained or dropped, plus the ones this step has read: the set a checkpoint saves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from learner.feeder import Feeder
from learner.telemetry import LearnerMetrics
from services.config import Config
from services.control import ControlPlane
from services.protocol import PromptTask, TrajectoryGroup
from services.queue import StreamQueue

log = logging.getLogger("orz.learner")

CONSUMER = "learner-0"
# Groups per XREADGROUP: one reply of a whole ORZ batch (128 groups × ~1 MB) would hold Redis's one thread
# while it is written, stalling every generator's XADD behind it.
READ_CHUNK = 16

Batch = list[tuple[str, TrajectoryGroup]]  # (stream entry id, group)


def invalid_group(group: TrajectoryGroup, task: PromptTask | None, version: int, vocab_size: int) -> str | None:
    """Why a decoded group cannot be trained on as the answer to `task` (None: it can). The wire format is
    checked by `services/protocol.py`; this checks it against what was fed, so a buggy or hostile generator
    cannot put a wrong prompt, a missing sample, an absurdly long response or a token outside the
    vocabulary into a batch."""
    if task is None:
        return f"task_id {group.task_id!r} was not fed by this run (or was fed before a resume)"
    if len(group.samples) != task.n_samples:
        return f"{len(group.samples)} samples, {task.n_samples} were asked for"
    if task.prompt_ids is not None and not np.array_equal(group.prompt_ids, np.asarray(task.prompt_ids)):
        return "prompt_ids differ from the prompt that was fed"
    if not 0 <= group.policy_version <= version or group.policy_version_last < group.policy_version:
        return f"policy versions {group.policy_version}..{group.policy_version_last} outside 0..{version}"
    # Whole-group reductions first (a 64-sample group is 2 numpy calls, not 128); the loop names the sample.
    lengths = [len(s.response_ids) for s in group.samples]
    if max(lengths) > task.sampling.max_tokens:
        i = next(i for i, n in enumerate(lengths) if n > task.sampling.max_tokens)
        return f"sample {i}: {lengths[i]} tokens, max_tokens is {task.sampling.max_tokens}"
    ids = group.response_ids_all()
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        i = next(i for i, s in enumerate(group.samples)
                 if len(s.response_ids) and (s.response_ids.min() < 0 or s.response_ids.max() >= vocab_size))
        return f"sample {i}: token id outside the vocabulary [0, {vocab_size})"
    for i, s in enumerate(group.samples):
        if s.finish_reason not in ("stop", "length", "abort"):
            return f"sample {i}: unknown finish_reason {s.finish_reason[:40]!r}"
        if s.verdict == "error":  # generators grade such samples again; one that published it has a bug
            return f"sample {i}: graded `error` (a fault of the grader), published as a reward"
    return None


class Intake:
    def __init__(self, cfg: Config, prompts: StreamQueue, trajectories: StreamQueue, feeder: Feeder,
                 control: ControlPlane, metrics: LearnerMetrics, stop: threading.Event,
                 consumed: set[str] | None = None) -> None:
        self.cfg = cfg
        self.prompts, self.trajectories, self.feeder, self.control = prompts, trajectories, feeder, control
        self.metrics = metrics
        self.stop_event = stop
        self.consumed: set[str] = consumed if consumed is not None else set()
        self.vocab_size = 2**31 - 1  # the learner sets its model's
        self._redis_checked, self._redis_run_id, self._last_reclaim = 0.0, None, time.time()

    def collect(self, step: int, version: int, drop_log: list[str], on_wait: Callable[[], None],
                on_redis_restart: Callable[[], None], filter_log: list[str] | None = None) -> tuple[Batch, list[str]]:
        """Reads until `batch_prompts` fresh groups are in hand; returns them and the entry ids to ack (the
        batch's and those of dropped groups). `on_wait` runs between reads (the learner syncs weights to
        generators that joined); `on_redis_restart` rewrites the learner's control keys after a restart.
        Groups filtered out (`learner.filter_groups`) go to `filter_log`; once `max_oversample` of them were
        this step, it takes the batch it has (short). Raises KeyboardInterrupt when the learner is told to stop,
        TimeoutError when nothing arrives."""
        lc = self.cfg.learner
        filter_log = [] if filter_log is None else filter_log
        cap = lc.max_oversample or 4 * lc.batch_prompts
        batch: Batch = []
        to_ack: list[str] = []
        last_arrival = time.time()
        while len(batch) < lc.batch_prompts and not (batch and len(filter_log) >= cap):
            if self.stop_event.is_set():
                raise KeyboardInterrupt
            self.feeder.top_up(version)
            self.watch_redis(version, on_redis_restart)
            entries = self._reclaim_own()
            entries += self.trajectories.read(CONSUMER, min(lc.batch_prompts - len(batch), READ_CHUNK),
                                              self.cfg.redis.block_ms)
            on_wait()
            if not entries:
                if time.time() - last_arrival > lc.wait_timeout_s:
                    raise TimeoutError(f"no trajectories for {lc.wait_timeout_s:.0f} s: are generators running?")
                continue
            last_arrival = time.time()
            in_hand = {eid for eid, _ in batch}.union(to_ack)
            for entry_id, group in entries:
                if entry_id in in_hand:
                    # Our own pending entry, read earlier in this step and not acked yet: `_reclaim_own` hands it
                    # back when the step waits longer than claim_idle_ms (a reward outage). Not a duplicate.
                    continue
                verdict = self._admit(entry_id, group, step, version, drop_log, filter_log)
                if verdict == "train":
                    batch.append((entry_id, group))
                elif verdict == "ack":
                    to_ack.append(entry_id)
        return batch, to_ack

    def _admit(self, entry_id: str, group: TrajectoryGroup, step: int, version: int, drop_log: list[str],
               filter_log: list[str]) -> str:
        """"train" (into the batch), "ack" (a duplicate, a stale group or a filtered one: acked with the batch)
        or "rejected" (dead-lettered here, its task fed again)."""
        if group.task_id in self.consumed:
            # A reclaimed prompt can be generated twice (docs/architecture.md, "Delivery"); train it once.
            self.metrics.duplicates.inc()
            return "ack"
        task = self.feeder.pending.get(group.task_id)
        problem = invalid_group(group, task, version, self.vocab_size)
        if problem is not None:
            # Well-formed on the wire but not an answer to what was fed: it must not reach the loss.
            # The task (if it is one of ours) is fed again, so it is still trained exactly once.
            self.trajectories.reject(entry_id, problem, group.to_bytes())
            self.metrics.rejected.inc()
            if task is not None:
                self.feeder.refeed([group.task_id], version, reason=f"invalid group: {problem}")
            return "rejected"
        self.consumed.add(group.task_id)
        if version - group.policy_version > self.cfg.learner.max_staleness:
            self.metrics.dropped.inc()
            drop_log.append(group.task_id)
            self.feeder.record("dropped_stale", group.task_id, step, version=version,
                               policy_version=group.policy_version, policy_version_last=group.policy_version_last)
            return "ack"
        if self.cfg.learner.filter_groups == "zero_variance" and len({s.reward for s in group.samples}) == 1:
            # Every sample earned the same reward: no group-relative signal (DAPO's dynamic sampling). Its slot
            # frees, so the feeder sends another prompt and the batch still fills.
            self.metrics.filtered.inc()
            filter_log.append(group.task_id)
            self.feeder.record("filtered", group.task_id, step)
            return "ack"
        return "train"

    def watch_redis(self, version: int, on_restart: Callable[[], None]) -> None:
        """Once a second: has Redis restarted (a new `run_id`)? Then put back what the restart may have lost.

        With AOF `everysec` a Redis *process* crash loses nothing acknowledged (the AOF is written before the
        reply); a machine crash loses the last second of writes, always a suffix. The learner's own state is
        the ledger of record: prompts it fed that are in neither stream any more are fed again; trajectories
        it already trained that reappear are duplicates; keys it owns are written again (`on_restart`).
        """
        if time.time() - self._redis_checked < 1.0:
            return
        self._redis_checked = time.time()
        run_id = self.control.server_run_id()
        if self._redis_run_id is not None and run_id != self._redis_run_id:
            log.warning("Redis restarted (run_id %s → %s): reconciling the run's streams", self._redis_run_id[:8],
                        run_id[:8])
            self._reconcile(version, on_restart)
        self._redis_run_id = run_id

    def _reconcile(self, version: int, on_restart: Callable[[], None]) -> None:
        t0 = time.time()
        self.prompts.ensure_group()
        self.trajectories.ensure_group()
        on_restart()
        lost = self.unaccounted()
        if lost:
            self.feeder.refeed(lost, version, reason="lost in a Redis restart")
        self.metrics.redis_restarts.inc()
        self.metrics.refed_lost.inc(len(lost))
        log.warning("after the Redis restart: %d in-flight prompt(s) were in neither stream and were fed again "
                    "(%.2f s)", len(lost), time.time() - t0)

    def unaccounted(self, in_hand: bool = False) -> list[str]:
        """In-flight tasks (fed, not trained, not in this step's hands) found in neither stream: lost.
        `in_hand`: count this step's tasks too (a stop mid-step: they were read, never trained, and their
        entries stay unacknowledged in the trajectory stream)."""
        present = self.prompts.task_ids() | self.trajectories.task_ids()
        return [t for t in self.feeder.pending if (in_hand or t not in self.consumed) and t not in present]

    def _reclaim_own(self) -> Batch:
        """Entries delivered to the learner whose reply it never saw (the connection broke mid-reply and the
        read was retried, or Redis came back from its AOF) stay pending on it: take them back."""
        rc = self.cfg.redis
        if time.time() - self._last_reclaim < min(rc.reclaim_every_s, rc.claim_idle_ms / 2000):
            return []
        self._last_reclaim = time.time()
        return self.trajectories.reclaim(CONSUMER, rc.claim_idle_ms, READ_CHUNK)

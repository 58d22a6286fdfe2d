"""Grading for the reward server: extraction in the parent, math-verify in killable worker processes.

sympy can hold the GIL for minutes on a short hostile answer (`\\boxed{9^{9^{9^9}}}`), and a thread cannot
be stopped, so comparisons run in a `pebble.ProcessPool`: each item gets `grade_timeout_s` of wall clock,
after which pebble kills its worker and forks a new one (../shared/notes/grading.md §2.3-2.5). The event
loop only extracts answers (linear string scans) and awaits futures. `math_verify` is imported, and warmed
once on a fixed input, here in the parent before the pool forks, so a replacement worker starts warm.

Model text reaches math-verify only as the extracted boxed content, wrapped as `"$" + content + "$"`; nothing
here calls `sympify`, `parse_expr` or `eval` on it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import resource
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeoutError
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import math_verify  # noqa: F401  (imported before the pool forks: workers inherit a loaded math-verify)
from math_verify import parse, verify
from pebble import ProcessExpired, ProcessPool
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from reward_server.graders import REGISTRY, VERDICTS, Verdict, run_compare
from services.config import RewardConfig

log = logging.getLogger("orz.reward.grading")


# ---------------------------------------------------------------------------------------------------------
# Worker side: these run inside the pool's processes.


def init_worker(mem_mb: int) -> None:
    """Caps the worker's address space (a short answer can reach 400-560 MB within seconds, notes §2.4) and
    takes away its file and network access."""
    limit = mem_mb << 20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    global _START_VM_MB
    _START_VM_MB = worker_vm_mb()  # read now: /proc is out of reach once sealed
    seal_descriptors()


def seal_descriptors() -> None:
    """No new file descriptor from here on: RLIMIT_NOFILE (soft and hard) at the lowest free descriptor number,
    so `open`, `socket`, `pipe` and `accept` all fail with EMFILE. A grader reads model text and writes a
    verdict over the pipes pebble opened before this ran; it has no reason to touch a file or the network,
    and if a parser bug ever let model text steer it, it still could not. Lowering the hard limit cannot be
    undone without CAP_SYS_RESOURCE. (math-verify and sympy are imported and warmed before the fork, so no
    lazy import needs a file afterwards.)"""
    open_fds = {int(fd) for fd in os.listdir("/proc/self/fd")}  # includes the listing's own, closed by now
    highest = max(open_fds)
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest, highest))
    while True:  # fill any hole below the limit with /dev/null, so not even one descriptor is left to take
        try:
            os.open(os.devnull, os.O_RDONLY)
        except OSError:
            break


def worker_vm_mb() -> float:
    """The worker's current address-space size (VmSize), to show the headroom left under RLIMIT_AS."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) / 1024
    return float("nan")


_START_VM_MB = float("nan")


def _ping() -> float:
    return _START_VM_MB


def _warm_up() -> None:
    """Parses and compares a fixed pair once, so lazily built parser state exists before forking.

    A worker forked after this grades its first item in ~10 ms instead of ~150 ms. It runs in a thread, off
    the event loop, so math-verify's SIGALRM timeouts are off; the input is a constant, never model text.
    """
    mv_log = logging.getLogger("math_verify")
    level = mv_log.level
    mv_log.setLevel(logging.ERROR)  # math-verify warns once when its timeout is off
    try:
        verify(parse("$\\frac{1}{2}$", parsing_timeout=None), parse("$0.5$", parsing_timeout=None),
               timeout_seconds=None)
    finally:
        mv_log.setLevel(level)


# ---------------------------------------------------------------------------------------------------------
# Parent side.


@dataclass(frozen=True)
class GradeResult:
    id: str
    reward: float
    extracted: str | None
    verdict: Verdict


class RewardMetrics:
    """The reward server's Prometheus series, registered into the caller's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.grades = Counter("orz_reward_grades", "graded items by grader (task_type) and verdict",
                              ["grader", "verdict"], registry=registry)
        self.grade_latency = Histogram(
            "orz_reward_grade_latency_seconds", "time to grade one item, queueing in the pool included",
            ["grader"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry)
        for grader in REGISTRY:
            self.grade_latency.labels(grader)
            for verdict in VERDICTS:
                self.grades.labels(grader, verdict)
        self.request_latency = Histogram(
            "orz_reward_request_latency_seconds", "time to answer one /v1/grade request",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=registry)
        self.request_items = Histogram(
            "orz_reward_request_items", "items per /v1/grade request",
            buckets=(1, 8, 32, 128, 512, 1024, 4096), registry=registry)
        self.timeouts = Counter("orz_reward_timeouts", "items past their time limit", registry=registry)
        self.worker_restarts = Counter(
            "orz_reward_worker_restarts", "grading workers killed (timeout) or lost (crash) and replaced",
            registry=registry)
        self.pool_restarts = Counter(
            "orz_reward_pool_restarts", "worker pools rebuilt after pebble declared them broken", registry=registry)
        self.in_flight = Gauge("orz_reward_in_flight", "items submitted to the worker pool, not yet graded",
                               registry=registry, multiprocess_mode="livesum")


class Grader:
    """Owns the worker pool; `grade_one` turns one item into a `GradeResult` without blocking the loop."""

    def __init__(self, cfg: RewardConfig, metrics: RewardMetrics, math_verify_timeout_s: int | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        # math-verify's own alarm is a backstop one second behind the outer kill, so `grade_timeout_s`
        # is what bounds an item; the alarm only matters if pebble's kill were late.
        self.math_verify_timeout_s = math_verify_timeout_s or math.ceil(cfg.grade_timeout_s) + 1
        self._pool: ProcessPool | None = None
        self.in_flight = 0

    async def start(self) -> float:
        """Warms math-verify, forks the pool and waits for one task per worker; returns a worker's VmSize (MB)."""
        await asyncio.to_thread(_warm_up)
        self._pool = self._new_pool()
        sizes = await asyncio.gather(*(asyncio.wrap_future(self._pool.schedule(_ping, timeout=30.0))
                                       for _ in range(self.cfg.grader_procs)))
        return max(sizes)

    def _new_pool(self) -> ProcessPool:
        return ProcessPool(max_workers=self.cfg.grader_procs, initializer=init_worker,
                           initargs=(self.cfg.worker_mem_mb,), context=multiprocessing.get_context("fork"))

    def _live_pool(self) -> ProcessPool:
        """The pool, rebuilt first if pebble gave up on it.

        pebble marks its whole pool broken for good when a worker dies while no task is running (an idle
        worker taken by the OOM killer, say); it replaces workers only when their task's death is seen.
        """
        if self._pool is None:
            raise RuntimeError("grader not started")
        if not self._pool.active:
            log.warning("grading pool broken (a worker died while idle); starting a new one")
            self.metrics.pool_restarts.inc()
            broken, self._pool = self._pool, self._new_pool()
            broken.stop()
            threading.Thread(target=broken.join, kwargs={"timeout": 10.0}, name="reap-pool", daemon=True).start()
        return self._pool

    def close(self) -> None:
        """Stops the pool at once: running grades are killed, nothing is waiting on them at shutdown."""
        if self._pool is not None:
            self._pool.stop()
            self._pool.join(timeout=10.0)
            self._pool = None

    async def grade_one(self, item_id: str, response: str, reference: str, truncated: bool,
                        task_type: str = "math") -> GradeResult:
        """Extracts the answer here (and compares it here, for cheap graders), or compares it in a worker;
        never raises for a bad item (verdict `error`)."""
        t0 = time.perf_counter()
        grader = REGISTRY[task_type]
        extracted = grader.extract(response)
        verdict: Verdict | None
        if truncated:
            verdict = "truncated"  # ORZ rewards only rollouts that stopped by themselves
        elif extracted is None:
            verdict = "no_answer"
        else:
            verdict = grader.screen(reference, extracted)
            if verdict is None and grader.in_pool:
                verdict = await self._grade_in_pool(item_id, task_type, reference, extracted)
            elif verdict is None:
                verdict = grader.compare(reference, extracted, self.math_verify_timeout_s)
        self.metrics.grades.labels(task_type, verdict).inc()
        self.metrics.grade_latency.labels(task_type).observe(time.perf_counter() - t0)
        return GradeResult(item_id, 1.0 if verdict == "correct" else 0.0, extracted, verdict)

    async def _grade_in_pool(self, item_id: str, task_type: str, reference: str, extracted: str) -> Verdict:
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            future = self._live_pool().schedule(
                run_compare, args=(task_type, reference, extracted, self.math_verify_timeout_s),
                timeout=self.cfg.grade_timeout_s)
            verdict: Verdict = await asyncio.wrap_future(future)
        except FutureTimeoutError:
            self.metrics.worker_restarts.inc()
            verdict = "timeout"
        except ProcessExpired as exc:
            self.metrics.worker_restarts.inc()
            log.warning("grading worker died on item %s (exit code %s); replaced", item_id, exc.exitcode)
            verdict = "error"
        except BrokenProcessPool:
            self.metrics.worker_restarts.inc()
            log.warning("grading pool broke while item %s was queued; it is rebuilt on the next item", item_id)
            verdict = "error"
        except Exception:
            log.exception("grading failed on item %s", item_id)
            verdict = "error"
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
        if verdict == "timeout":
            self.metrics.timeouts.inc()
        return verdict

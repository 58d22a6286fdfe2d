"""Grading for the reward server: extraction in the parent, math-verify in killable, sealed worker processes.

sympy can hold the GIL for minutes on a short hostile answer (`\\boxed{9^{9^{9^9}}}`), and a thread cannot
be stopped (a `ThreadPoolExecutor` + `asyncio.wait_for` of 1 s never fired in 25 s on it), so comparisons
run in a `pebble.ProcessPool`: each item gets `grade_timeout_s` of wall clock, after which pebble kills its
worker and forks a new one. The event loop only extracts answers (linear string scans) and awaits futures.
Every module grading can import is loaded, and math-verify warmed once on a fixed input, here in the parent
before the pool forks (reward_server/sandbox.py), so a replacement worker starts warm and a sealed worker
never needs a file.

Model text reaches math-verify only as the extracted boxed content, wrapped as `"$" + content + "$"`; nothing
here calls `sympify`, `parse_expr` or `eval` on it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
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
from reward_server.graders.math import MathGrader
from reward_server.sandbox import init_worker, preload_grading_modules, start_vm_mb
from services.config import RewardConfig

log = logging.getLogger("orz.reward.grading")

# Address space a worker must have left under `reward.worker_mem_mb` once sealed. Grading 4,200 varied answers
# grew a worker by 13 MB; a hostile answer can take 400-560 MB, and is then cut off by the cap.
MIN_HEADROOM_MB = 256


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


@dataclass(frozen=True)
class GradeResult:
    id: str
    reward: float
    extracted: str | None
    verdict: Verdict
    detail: str | None = None  # for `error`: what went wrong in the grader (never about the answer)


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


class _ErrorLog:
    """One log line per kind of grader fault per `every_s`, with how many items it hit meanwhile: a broken
    deployment fails every item, and one line per item would bury everything else in the log."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def note(self, item_id: str, task_type: str, detail: str) -> None:
        key = f"{task_type}: {detail}"
        if len(self._last) > 1000:  # details that never repeat must not grow this without bound
            self._last.clear()
            self._count.clear()
        self._count[key] = self._count.get(key, 0) + 1
        now = time.monotonic()
        if now - self._last.get(key, -self.every_s) >= self.every_s:
            log.warning("grader fault on item %s (%d item(s) since the last report), verdict error: %s", item_id,
                        self._count.pop(key), key)
            self._last[key] = now


class Grader:
    """Owns the worker pool; `grade_one` turns one item into a `GradeResult` without blocking the loop."""

    def __init__(self, cfg: RewardConfig, metrics: RewardMetrics, math_verify_timeout_s: int | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        # extraction runs here, so its options live here; the sealed workers only compare
        self.graders = {**REGISTRY, "math": MathGrader(fallback_boxed=cfg.math_fallback_boxed)}
        # math-verify's own alarm is a backstop one second behind the outer kill, so `grade_timeout_s`
        # is what bounds an item; the alarm only matters if pebble's kill were late.
        self.math_verify_timeout_s = math_verify_timeout_s or math.ceil(cfg.grade_timeout_s) + 1
        self._pool: ProcessPool | None = None
        self.in_flight = 0
        self._error_log = _ErrorLog()

    async def start(self) -> float:
        """Loads every grading module, warms math-verify, forks the pool and waits for one task per worker;
        returns a worker's VmSize (MB) when it was sealed."""
        # On the loop's own thread, before the server answers anything: the import block it installs for a
        # second is process-wide, and no other import may run meanwhile.
        modules, seconds = preload_grading_modules()
        log.info("grading modules loaded before the seal: %d more in %.2f s", modules, seconds)
        await asyncio.to_thread(_warm_up)
        self._pool = self._new_pool()
        sizes = await asyncio.gather(*(asyncio.wrap_future(self._pool.schedule(start_vm_mb, timeout=30.0))
                                       for _ in range(self.cfg.grader_procs)))
        if max(sizes) + MIN_HEADROOM_MB > self.cfg.worker_mem_mb:
            self.close()
            # Under the cap a worker's allocations fail with MemoryError, which math-verify catches inside its
            # own fallbacks and answers False: correct answers would be graded wrong, silently.
            raise RuntimeError(f"reward.worker_mem_mb={self.cfg.worker_mem_mb} leaves a grading worker (already "
                               f"{max(sizes):.0f} MB of address space) less than {MIN_HEADROOM_MB} MB to grade in; "
                               f"set it to at least {math.ceil(max(sizes)) + MIN_HEADROOM_MB}")
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
        never raises for a bad item. A fault of the grader itself gives the verdict `error`, with `detail`."""
        t0 = time.perf_counter()
        grader = self.graders[task_type]
        extracted = grader.extract(response)
        verdict: Verdict | None
        detail = None
        if truncated:
            verdict = "truncated"  # ORZ rewards only rollouts that stopped by themselves
        elif extracted is None:
            verdict = "no_answer"
        else:
            verdict = grader.screen(reference, extracted)
            if verdict is None and grader.in_pool:
                verdict, detail = await self._grade_in_pool(item_id, task_type, reference, extracted)
            elif verdict is None:
                try:
                    verdict = grader.compare(reference, extracted, self.math_verify_timeout_s)
                except Exception as exc:  # a bug in a cheap grader: not the answer's fault
                    verdict, detail = "error", f"grader fault: {type(exc).__name__}: {exc}"[:300]
        if verdict == "error":
            self._error_log.note(item_id, task_type, detail or "unknown")
        self.metrics.grades.labels(task_type, verdict).inc()
        self.metrics.grade_latency.labels(task_type).observe(time.perf_counter() - t0)
        return GradeResult(item_id, 1.0 if verdict == "correct" else 0.0, extracted, verdict, detail)

    async def _grade_in_pool(self, item_id: str, task_type: str, reference: str,
                             extracted: str) -> tuple[Verdict, str | None]:
        self.in_flight += 1
        self.metrics.in_flight.inc()
        detail: str | None = None
        try:
            future = self._live_pool().schedule(
                run_compare, args=(task_type, reference, extracted, self.math_verify_timeout_s),
                timeout=self.cfg.grade_timeout_s)
            verdict, detail = await asyncio.wrap_future(future)
        except FutureTimeoutError:
            self.metrics.worker_restarts.inc()
            verdict = "timeout"
        except ProcessExpired as exc:
            self.metrics.worker_restarts.inc()
            verdict, detail = "error", f"grading worker died (exit code {exc.exitcode}); replaced"
        except BrokenProcessPool:
            self.metrics.worker_restarts.inc()
            verdict, detail = "error", "grading pool broke while the item was queued; rebuilt on the next item"
        except Exception as exc:
            log.exception("grading failed on item %s", item_id)
            verdict, detail = "error", f"{type(exc).__name__}: {exc}"[:300]
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
        if verdict == "timeout":
            self.metrics.timeouts.inc()
        return verdict, detail

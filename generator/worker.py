"""`orz generator`: the rollout worker.

Continuous batching: up to `max_inflight_requests` prompts are in the vLLM engine at once; as groups finish
(all `n_samples` completions, with the sampled tokens' log-probs) they are graded together in one call to
the reward server, published as TrajectoryGroups, and their prompts XACKed, and new prompts (including
ones a dead peer left pending, via XAUTOCLAIM) take the free slots. New weights arrive on a background
thread (services/weight_sync.py) and are loaded between engine steps; requests in flight continue under
them (PipelineRL's in-flight update), and each group carries the version at its first and last token.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from generator.engine import Completion, VllmEngine, make_engine, model_layout
from generator.reward_client import GradeItem, RewardClient, RewardClientError
from services.config import Config
from services.memory import HeapTrimmer
from services.metrics import MetricsServer
from services.protocol import PromptTask, ProtocolError, Sample, SamplingParams, TrajectoryGroup, WeightsAnnouncement
from services.queue import Keys, StreamQueue
from services.redis_server import connect_cfg
from services.weight_sync import PROBE_VERSION, REFORM_VERSION, STOP_VERSION, WeightReceiver, layout_digest

if TYPE_CHECKING:
    from generator.hf_engine import TransformersEngine

log = logging.getLogger("orz.generator")

PROMPT_GROUP = "generators"


class GeneratorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.tokens = Counter("orz_generator_tokens", "response tokens sampled", registry=r)
        self.tokens_per_s = Gauge("orz_generator_tokens_per_second", "tokens/s of the last engine call", registry=r)
        self.groups = Counter("orz_generator_groups", "trajectory groups published", registry=r)
        self.inflight = Gauge("orz_generator_requests_in_flight", "prompts in the engine", registry=r)
        self.version = Gauge("orz_generator_policy_version", "weights version loaded", registry=r)
        self.version_lag = Gauge("orz_generator_version_lag", "learner version minus loaded version", registry=r)
        self.weight_load = Histogram("orz_generator_weight_load_seconds", "time to load new weights",
                                     registry=r, buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120))
        self.reward_latency = Histogram("orz_generator_reward_latency_seconds", "grading call latency",
                                        registry=r, buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30))
        self.reward_errors = Counter("orz_generator_reward_errors", "failed grading calls", registry=r)
        self.reclaimed = Counter("orz_generator_prompts_reclaimed", "prompts reclaimed from dead peers",
                                 registry=r)
        self.queue_lag = Gauge("orz_generator_queue_lag_seconds", "age of the oldest prompt taken", registry=r)
        self.aborted = Counter("orz_generator_requests_aborted", "requests aborted by a weight update (abort mode)",
                               registry=r)
        self.rejected = Counter("orz_generator_prompts_rejected", "prompts dead-lettered: decoded but not samplable "
                                "(no prompt ids, too long for the engine, token ids the engine refuses)", registry=r)
        self.busy = Counter("orz_generator_engine_busy_seconds", "time spent in engine steps with requests in "
                            "flight (busy fraction: its rate)", registry=r)


class WeightListener(threading.Thread):
    """Member of the learner's weight-sync group (learner/weight_group.py); keeps the newest received version
    for the main loop to load between engine steps.

    Waits for an announcement that lists this generator, joins as the rank it was given, and receives
    versions until the learner closes the group: REFORM_VERSION (membership changed) or a broken connection
    (the learner re-forms after a failed broadcast, or restarted) send it back to wait for the next
    announcement; STOP_VERSION ends it. The learner only lists generators with a fresh heartbeat.
    """

    def __init__(self, cfg: Config, redis, keys: Keys, generator_id: str, stop: threading.Event,
                 layout: str | None = None) -> None:
        super().__init__(name="weight-listener", daemon=True)
        self.cfg, self.redis, self.keys, self.generator_id, self.stop_event = cfg, redis, keys, generator_id, stop
        self.layout = layout  # digest of the served model's names and shapes (None: not checked)
        self._lock = threading.Lock()
        self._pending: tuple[int, list] | None = None
        self._released = threading.Event()  # the main loop is done with the last version handed over
        self._released.set()
        self.error: BaseException | None = None
        self.rank: int | None = None
        self.joined = 0  # groups joined so far
        self.stopped = False  # the learner closed weight sync for good

    def take(self) -> tuple[int, list] | None:
        """The newest received version not yet taken; call `release()` once its tensors are loaded."""
        with self._lock:
            pending, self._pending = self._pending, None
            return pending

    def release(self) -> None:
        """The weights last taken are loaded: the receiver may reuse its buffers for the next version."""
        self._released.set()

    def _announcement(self, after_session: str | None) -> WeightsAnnouncement | None:
        """The first announcement listing this generator whose session is not `after_session`."""
        while not self.stop_event.is_set():
            raw = self.redis.get(self.keys.weights_meta)
            if raw is not None:
                try:
                    ann = WeightsAnnouncement.from_bytes(raw)
                except ProtocolError as exc:
                    raise RuntimeError(f"unreadable weight-sync announcement: {exc}") from None
                theirs = layout_digest(ann.names, ann.shapes)
                if self.layout is not None and theirs != self.layout:
                    raise RuntimeError(
                        f"the learner broadcasts a model of another architecture ({len(ann.names)} tensors, layout "
                        f"{theirs[:12]}) than this generator serves ({self.cfg.model.path}, layout "
                        f"{self.layout[:12]}): check model.base_path on both")
                if ann.session != after_session and self.generator_id in ann.members:
                    return ann
            self.stop_event.wait(0.2)
        return None

    def _newer_group(self, session: str) -> bool:
        """The learner has announced another group that lists this generator (it re-formed or restarted)."""
        try:
            raw = self.redis.get(self.keys.weights_meta)
            ann = None if raw is None else WeightsAnnouncement.from_bytes(raw)
        except (ProtocolError, redis.RedisError):  # unreadable, or Redis away: stay in the group
            return False
        return ann is not None and ann.session != session and self.generator_id in ann.members

    def run(self) -> None:
        session: str | None = None
        try:
            while not self.stop_event.is_set():
                ann = self._announcement(session)
                if ann is None:
                    return
                session = ann.session
                self.rank = ann.members.index(self.generator_id) + 1
                try:
                    receiver = WeightReceiver(ann, self.rank, self.cfg.weight_sync.timeout_s)
                except Exception as exc:  # the learner gave up on this group before we arrived
                    log.warning("could not join weight-sync group %s: %s", ann.session[:8], exc)
                    continue
                self.joined += 1
                log.info("joined weight-sync group %s as rank %d/%d", ann.session[:8], self.rank, ann.world_size)
                while not self.stop_event.is_set():
                    # The received tensors are views into the receiver's reusable buffers: the next version
                    # is received only once the main loop has loaded this one (between two engine steps).
                    while not self._released.wait(0.1):
                        if self.stop_event.is_set():
                            return
                    try:
                        version, weights = receiver.receive(lambda s=session: self._newer_group(s))
                    except Exception as exc:
                        log.warning("weight-sync group %s closed (%s); waiting for the next one", ann.session[:8],
                                    exc)
                        break
                    if version == STOP_VERSION:
                        log.info("learner closed the weight-sync group")
                        self.stopped = True
                        return
                    if version == REFORM_VERSION:
                        log.info("weight-sync membership changed; re-joining")
                        break
                    if version == PROBE_VERSION:  # the learner timed this link; nothing to load
                        continue
                    with self._lock:
                        self._released.clear()
                        self._pending = (version, weights)
        except BaseException as exc:  # surfaced to the main loop, which decides to exit
            if not self.stop_event.is_set():
                self.error = exc
                log.exception("weight listener failed")


@dataclass
class _InFlight:
    entry_id: str  # the prompt's stream entry, acked once its group is published
    task: PromptTask
    version_first: int  # weights version when the request entered the engine (its first token)
    submitted: float


MAX_PUBLISH_BACKLOG = 8  # engine steps' worth of finished groups waiting for grading before the engine waits


class Generator:
    def __init__(self, cfg: Config, generator_id: str | None = None, engine_factory=None, reward=None) -> None:
        """`engine_factory(generator_config, model_path, seed=…)` and `reward` (a RewardClient) default to the
        configured backend and reward server; bench/simulate.py passes cost models instead."""
        self.cfg = cfg
        self.id = generator_id or f"gen-{socket.gethostname()}-{os.getpid()}"
        self.keys = Keys(cfg.namespace)
        self.redis = connect_cfg(cfg.redis)
        self.prompts = StreamQueue(self.redis, self.keys.prompts, PROMPT_GROUP, PromptTask, self.keys.dead)
        self.trajectories_stream = self.keys.trajectories
        self.metrics = GeneratorMetrics()
        self.stop_event = threading.Event()
        self.version = 0
        if not cfg.reward.url and reward is None:
            raise ValueError("reward.url is not set: point the generator at a reward server (ORZ__REWARD__URL)")
        self.reward = reward or RewardClient(
            cfg.reward.url, cfg.reward.request_timeout_s, cfg.reward.token, cfg.reward.retry_s,
            on_failure=lambda url, err: self.metrics.reward_errors.inc())
        # Names and shapes of the model this generator serves: the learner leaves a generator whose model differs
        # from its own out of the weight-sync group, and the generator refuses such a group (cost models: none).
        self.layout = layout_digest(*model_layout(cfg.model.path)) if engine_factory is None else None
        self._engine_factory = engine_factory or make_engine
        self.engine: VllmEngine | TransformersEngine | None = None
        self.inflight: dict[str, _InFlight] = {}  # request id → prompt in the engine
        self.waiting: list[tuple[str, PromptTask, float]] = []  # taken, waiting for their feed version's weights
        # Finished groups are graded and published on one background thread while the engine keeps stepping
        # (grading is an HTTP round trip per batch of finished groups; the engine would idle through it).
        self._publisher = ThreadPoolExecutor(1, thread_name_prefix="publish")
        # Prompt entries taken and not yet acked or rejected (in the engine, waiting, or being graded): the
        # leases `_renew_leases` keeps alive. The publishing thread removes what it acks.
        self._held: set[str] = set()
        self._held_lock = threading.Lock()
        self._publishing: deque[Future] = deque()
        self._seq = 0
        self.started = time.time()
        self.busy_s = 0.0  # time in engine steps with requests in flight (the GPU's busy time)
        self._last_reclaim = 0.0
        self._window_tokens = 0
        self._window_start = time.time()

    def _renew_leases(self) -> None:
        """Resets the idle time of the prompts this generator still holds (XCLAIM JUSTID to itself), so peers
        reclaim (`claim_idle_ms`) only the prompts of a generator that stopped heartbeating, never those of
        one that is merely slow: a long generation, or grading held up by a reward-server outage."""
        with self._held_lock:
            held = set(self._held)
        if not held:
            return
        mine = self.redis.xpending_range(self.keys.prompts, PROMPT_GROUP, "-", "+", len(held) + 64,
                                         consumername=self.id)
        ids = [p["message_id"] for p in mine if _text(p["message_id"]) in held]
        if ids:
            self.redis.xclaim(self.keys.prompts, PROMPT_GROUP, self.id, 0, ids, justid=True)

    def _heartbeat(self) -> None:
        self._renew_leases()
        state = {"ts": time.time(), "version": self.version, "pid": os.getpid(), "host": socket.gethostname(),
                 "started": self.started, "busy_s": round(self.busy_s, 4), "layout": self.layout}
        self.redis.hset(self.keys.generators, self.id, json.dumps(state))

    def _load_checkpoint(self) -> None:
        """A generator joining a run that is under way starts from the learner's newest checkpoint on disk
        (`{ns}:checkpoint`), not the base model, then receives newer versions once it is in the group."""
        raw = self.redis.get(self.keys.checkpoint)
        if raw is None or self.engine is None:
            return
        info = json.loads(raw)
        if int(info["version"]) <= self.version:
            return
        try:
            seconds = self.engine.load_weights_from_dir(info["path"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("could not load checkpoint %s (%s); waiting for broadcast weights", info.get("path"), exc)
            return
        self.version = int(info["version"])
        self.metrics.version.set(self.version)
        log.info("loaded checkpoint v%d from %s in %.2f s", self.version, info["path"], seconds)

    def _load_pending(self, listener: WeightListener) -> None:
        if self.engine is None:
            return
        pending = listener.take()
        if pending is None:
            return
        try:
            self._load_version(*pending)
        finally:
            listener.release()

    def _load_version(self, version: int, weights: list) -> None:
        # Whatever the learner sends is loaded, even an older version: a learner restarted from its checkpoint
        # (`--auto-resume` in a restarted pod) is behind the weights its generators hold, and samples from
        # that lost future would be rejected by it (learner.main.invalid_group) until it caught up.
        if version < self.version:
            log.warning("the learner sent v%d while v%d is loaded: it was restarted from a checkpoint", version,
                        self.version)
        if self.cfg.generator.weight_update_mode == "abort" and self.inflight:
            # AReaL-style: requests in flight are dropped and sampled again under the new weights, so every
            # sample is from one version. ("keep", PipelineRL-style: they continue, spanning two versions.)
            self.engine.abort(list(self.inflight))
            resubmit = [(job.entry_id, job.task, time.time()) for job in self.inflight.values()]
            self.inflight.clear()
            self.waiting = resubmit + self.waiting
            self.metrics.aborted.inc(len(resubmit))
        seconds = self.engine.load_weights(weights)
        self.version = version
        self.metrics.weight_load.observe(seconds)
        self.metrics.version.set(version)
        log.info("loaded weights v%d in %.3f s", version, seconds)

    def _take_prompts(self, n: int, block_ms: int | None) -> list[tuple[str, PromptTask]]:
        rc = self.cfg.redis
        taken = []
        # XAUTOCLAIM walks the whole pending list: once per loop from every generator, it kept Redis's one
        # thread busy at 64 generators (bench/simulate.py). A dead peer's prompts wait claim_idle_ms anyway.
        if time.time() - self._last_reclaim >= min(rc.reclaim_every_s, rc.claim_idle_ms / 2000):
            self._last_reclaim = time.time()
            taken = self.prompts.reclaim(self.id, rc.claim_idle_ms, n)
        if taken:
            self.metrics.reclaimed.inc(len(taken))
            log.info("reclaimed %d prompts left pending by a dead peer", len(taken))
        if len(taken) < n:
            taken += self.prompts.read(self.id, n - len(taken), block_ms)
        good = []
        for entry_id, task in taken:
            problem = self._invalid_prompt(task)
            if problem is None:
                good.append((entry_id, task))
            else:  # one bad prompt must not stop the generator (nor, reclaimed, every generator in turn)
                self.prompts.reject(entry_id, problem, task.to_bytes())
                self.metrics.rejected.inc()
        taken = good
        with self._held_lock:
            self._held.update(eid for eid, _ in taken)
        if taken:
            oldest = min(int(eid.split("-")[0]) for eid, _ in taken) / 1000.0
            self.metrics.queue_lag.set(max(0.0, time.time() - oldest))
        return taken

    def _invalid_prompt(self, task: PromptTask) -> str | None:
        """Why this engine cannot sample `task` as asked (None: it can)."""
        if not task.prompt_ids:
            return "no prompt_ids (the feeder tokenizes every prompt)"
        room = self.cfg.generator.max_model_len - len(task.prompt_ids)
        if room < 1:
            return f"prompt of {len(task.prompt_ids)} tokens does not fit generator.max_model_len"
        if min(task.prompt_ids) < 0:
            return "negative token id in prompt_ids"
        return None

    def _submit_ready(self, listener: WeightListener) -> None:
        """Starts waiting prompts whose weights are here.

        A prompt is never sampled with weights older than the version it was fed at: the learner feeds right
        after its broadcast returns, which can be a moment before the listener has unpacked the new weights.
        Holding such a prompt (briefly, `weight_wait_s` at most) keeps staleness at the admission-control
        bound; the engine keeps stepping meanwhile.
        """
        still_waiting = []
        for entry_id, task, since in self.waiting:
            overdue = time.time() - since > self.cfg.generator.weight_wait_s or listener.stopped
            if task.feed_version <= self.version or overdue:
                self._seq += 1
                rid = f"{entry_id}#{self._seq}"
                assert self.engine is not None
                try:
                    self.engine.submit(rid, list(task.prompt_ids or ()), task.sampling, task.n_samples)
                except (ValueError, TypeError) as exc:  # the engine's own checks (a token id past the vocabulary)
                    self.prompts.reject(entry_id, f"engine refused the prompt: {exc}"[:500], task.to_bytes())
                    self.metrics.rejected.inc()
                    self._release([entry_id])
                    continue
                self.inflight[rid] = _InFlight(entry_id, task, self.version, time.time())
            else:
                still_waiting.append((entry_id, task, since))
        self.waiting = still_waiting
        self.metrics.inflight.set(len(self.inflight))

    def _hand_off(self, finished: list[tuple[str, list[Completion]]]) -> None:
        """Moves finished groups out of the engine's books and onto the publishing thread."""
        jobs = [(self.inflight.pop(rid), comps) for rid, comps in finished]
        self.metrics.inflight.set(len(self.inflight))
        n_tokens = sum(len(c.token_ids) for _, comps in jobs for c in comps)
        self.metrics.tokens.inc(n_tokens)
        self._window_tokens += n_tokens
        while len(self._publishing) >= MAX_PUBLISH_BACKLOG:  # grading fell behind: wait for the oldest batch
            try:
                self._publishing[0].result(timeout=self.cfg.generator.heartbeat_s)
            except FutureTimeout:  # still alive, only waiting (a reward-server outage): keep the leases
                self._heartbeat()
                continue
            self._publishing.popleft()
        self._publishing.append(self._publisher.submit(self._publish, jobs, self.version))

    def _collect_published(self, block: bool = False) -> None:
        """Surfaces the publishing thread's errors (a failed grade or Redis write stops the generator; its
        prompts stay pending and a peer reclaims them)."""
        while self._publishing and (block or self._publishing[0].done()):
            self._publishing.popleft().result()

    def _publish(self, jobs: list[tuple[_InFlight, list[Completion]]], version_last: int) -> None:
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
        pipe = self.redis.pipeline(transaction=False)
        for ji, (job, comps) in enumerate(jobs):
            samples = tuple(
                Sample(np.asarray(c.token_ids, dtype=np.int32), np.asarray(c.logprobs, dtype=np.float32),
                       by_id[f"{ji}/{si}"].reward, c.finish_reason, c.text, by_id[f"{ji}/{si}"].verdict)
                for si, c in enumerate(comps)
            )
            group = TrajectoryGroup(
                task_id=job.task.task_id, prompt_ids=np.asarray(job.task.prompt_ids, dtype=np.int32),
                samples=samples, policy_version=job.version_first, policy_version_last=version_last,
                generator_id=self.id,
                timings={"generate_s": time.time() - job.submitted, "grade_s": grade_s, "published_at": time.time()},
            )
            pipe.xadd(self.trajectories_stream, {"m": group.to_bytes()})
        pipe.execute()
        # Acked only after the trajectories are in Redis: a crash before this leaves the prompts pending,
        # and a live peer reclaims them (ARCHITECTURE.md, step 4).
        self.prompts.ack([job.entry_id for job, _ in jobs])
        self._release([job.entry_id for job, _ in jobs])
        self.metrics.groups.inc(len(jobs))

    def _release(self, entry_ids: list[str]) -> None:
        with self._held_lock:
            self._held.difference_update(entry_ids)

    def _log_window(self) -> None:
        elapsed = time.time() - self._window_start
        if elapsed >= 10.0:
            rate = self._window_tokens / elapsed
            self.metrics.tokens_per_s.set(rate)
            log.info("v%d: %.0f tok/s over %.0f s, %d prompts in the engine, %d waiting for weights",
                     self.version, rate, elapsed, len(self.inflight), len(self.waiting))
            self._window_tokens, self._window_start = 0, time.time()

    def run(self) -> None:
        gcfg = self.cfg.generator
        if threading.current_thread() is threading.main_thread():  # several run as threads in bench/simulate.py
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop_event.set())
        server = MetricsServer(self.metrics.registry, gcfg.metrics_port, host=gcfg.metrics_host,
                               health=lambda: {"status": "ok", "id": self.id, "version": self.version})
        log.info("generator %s: metrics on :%d", self.id, server.port)
        self.prompts.ensure_group()
        listener = WeightListener(self.cfg, self.redis, self.keys, self.id, self.stop_event, self.layout)
        listener.start()
        self.engine = self._engine_factory(gcfg, self.cfg.model.path, seed=gcfg.seed + os.getpid())
        # One tiny request first: the engine's first call pays one-off allocations (KV blocks, kernels).
        self.engine.generate([[1, 2, 3]], [SamplingParams(1.0, 1.0, 4)], [1])
        self._load_checkpoint()
        # Registered only now, with the engine up: the learner adds this generator to the next weight-sync
        # group it forms and sends it the current weights.
        self._heartbeat()
        last_beat = 0.0
        learner_version = 0
        heap = HeapTrimmer()
        try:
            while not self.stop_event.is_set():
                if listener.error is not None:
                    raise RuntimeError("weight-sync listener failed") from listener.error
                if time.time() - last_beat > gcfg.heartbeat_s:
                    self._heartbeat()
                    raw = self.redis.get(self.keys.policy_version)
                    learner_version = int(raw) if raw is not None else self.version
                    self.metrics.version_lag.set(learner_version - self.version)
                    last_beat = time.time()
                    heap.maybe()
                self._load_pending(listener)  # between engine steps; requests in flight continue
                lag = learner_version - self.version
                room = gcfg.max_inflight_requests - len(self.inflight) - len(self.waiting)
                if lag > self.cfg.learner.max_staleness:
                    # Backpressure: samples from these weights would be dropped as stale; wait for new ones.
                    self.stop_event.wait(0.01)
                elif room > 0:
                    idle = not self.inflight and not self.waiting
                    taken = self._take_prompts(min(room, gcfg.prompts_per_batch),
                                               self.cfg.redis.block_ms if idle else None)
                    self.waiting += [(eid, task, time.time()) for eid, task in taken]
                self._submit_ready(listener)
                self._collect_published()
                if self.inflight:
                    t_step = time.perf_counter()
                    finished = self.engine.step()
                    step_s = time.perf_counter() - t_step
                    self.busy_s += step_s
                    self.metrics.busy.inc(step_s)
                    if finished:
                        self._hand_off(finished)
                elif self.waiting:
                    self.stop_event.wait(0.005)
                self._log_window()
            self._collect_published(block=True)
        finally:
            self.stop_event.set()
            self._publisher.shutdown(wait=True)
            self.redis.hdel(self.keys.generators, self.id)
            self.reward.close()
            server.close()
            log.info("generator %s stopped", self.id)


def run(cfg: Config, generator_id: str | None = None) -> None:
    Generator(cfg, generator_id).run()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

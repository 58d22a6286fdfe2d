"""`orz generator`: the rollout worker.

Continuous batching: up to `max_inflight_requests` prompts are in the vLLM engine at once; as groups finish
(all `n_samples` completions, with the sampled tokens' log-probs) they are graded together in one call to
the reward server, published as TrajectoryGroups, and their prompts XACKed, and new prompts (including
ones a dead peer left pending, via XAUTOCLAIM) take the free slots. New weights arrive on a background
thread (services/weight_sync.py) and are loaded between engine steps; requests in flight continue under
them (PipelineRL's in-flight update), and each group carries the version at its first and last token.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from generator.engine import make_engine, model_layout
from generator.engine_api import Completion, Engine
from generator.publisher import InFlight, Publisher
from generator.reward_client import RewardClient
from services.config import Config
from services.control import ControlPlane, Heartbeat, Keys
from services.membership import WeightListener
from services.memory import HeapTrimmer, keep_freed_memory
from services.metrics import MetricsServer
from services.protocol import PromptTask, SamplingParams
from services.queue import StreamQueue, eval_queue, trajectory_queue
from services.redis_client import connect_cfg
from services.weight_sync import layout_digest

log = logging.getLogger("orz.generator")

PROMPT_GROUP = "generators"


PROMPT_POLL_S = 0.05  # a busy generator that found no prompts looks again after this


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


class Generator:
    def __init__(self, cfg: Config, generator_id: str | None = None, engine_factory=None, reward=None) -> None:
        """`engine_factory(generator_config, model_path, seed=…)` and `reward` (a RewardClient) default to the
        configured backend and reward server; bench/simulate.py passes cost models instead."""
        self.cfg = cfg
        keep_freed_memory()  # message-sized blocks reuse pages instead of faulting new ones in
        self.id = generator_id or f"gen-{socket.gethostname()}-{os.getpid()}"
        self.keys = Keys(cfg.namespace)
        self.redis = connect_cfg(cfg.redis)
        self.prompts = StreamQueue(self.redis, self.keys.prompts, PROMPT_GROUP, PromptTask, self.keys.dead)
        self.trajectories = trajectory_queue(self.redis, self.keys)
        self.evals = eval_queue(self.redis, self.keys)
        self.control = ControlPlane(self.redis, self.keys)
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
        self.engine: Engine | None = None
        self.inflight: dict[str, InFlight] = {}  # request id → prompt in the engine
        self.waiting: list[tuple[str, PromptTask, float]] = []  # taken, waiting for their feed version's weights
        self.publisher = Publisher(self.id, self.prompts, self.trajectories, self.evals, self.reward,
                                   self.metrics, cfg.generator.heartbeat_s)
        self._seq = 0
        self.started = time.time()
        self.busy_s = 0.0  # time in engine steps with requests in flight (the GPU's busy time)
        self._last_reclaim = 0.0
        self._poll_after = 0.0  # no non-blocking prompt read before this (the stream was empty last time)
        self._window_tokens = 0
        self._window_start = time.time()

    def _heartbeat(self) -> None:
        self.publisher.renew()
        self.control.beat(self.id, Heartbeat(ts=time.time(), version=self.version, pid=os.getpid(),
                                             host=socket.gethostname(), started=self.started,
                                             busy_s=round(self.busy_s, 4), layout=self.layout))

    def _load_checkpoint(self) -> None:
        """A generator joining a run that is under way starts from the learner's newest checkpoint on disk
        (`{ns}:checkpoint`), not the base model, then receives newer versions once it is in the group."""
        pointer = self.control.checkpoint()
        if pointer is None or self.engine is None or pointer.version <= self.version:
            return
        try:
            seconds = self.engine.load_weights_from_dir(pointer.path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("could not load checkpoint %s (%s); waiting for broadcast weights", pointer.path, exc)
            return
        self.version = pointer.version
        self.metrics.version.set(self.version)
        log.info("loaded checkpoint v%d from %s in %.2f s", self.version, pointer.path, seconds)

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
        # that lost future would be rejected by it (learner.intake.invalid_group) until it caught up.
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
        self.publisher.hold(eid for eid, _ in taken)
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
        assert self.engine is not None
        limit = self.cfg.generator.engine_queue_samples
        queued = self.engine.queued() if limit is not None and hasattr(self.engine, "queued") else None
        for entry_id, task, since in self.waiting:
            overdue = time.time() - since > self.cfg.generator.weight_wait_s or listener.stopped
            if queued is not None and queued >= limit:
                # The engine is full and a prompt's worth of samples waits for its slots already: this one waits
                # here, unstamped, not in the engine's queue under weights that will be old when it starts.
                still_waiting.append((entry_id, task, since))
            elif task.feed_version <= self.version or overdue:
                queued = None if queued is None else queued + task.n_samples
                self._seq += 1
                rid = f"{entry_id}#{self._seq}"
                try:
                    self.engine.submit(rid, list(task.prompt_ids or ()), task.sampling, task.n_samples)
                except (ValueError, TypeError) as exc:  # the engine's own checks (a token id past the vocabulary)
                    self.prompts.reject(entry_id, f"engine refused the prompt: {exc}"[:500], task.to_bytes())
                    self.metrics.rejected.inc()
                    self.publisher.release([entry_id])
                    continue
                self.inflight[rid] = InFlight(entry_id, task, self.version, time.time())
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
        self.publisher.submit(jobs, self.version, self._heartbeat)

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
        listener = WeightListener(self.cfg, self.control, self.id, self.stop_event, self.layout)
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
                    published = self.control.policy_version()
                    learner_version = published if published is not None else self.version
                    self.metrics.version_lag.set(learner_version - self.version)
                    last_beat = time.time()
                    heap.maybe()
                self._load_pending(listener)  # between engine steps; requests in flight continue
                lag = learner_version - self.version
                room = gcfg.max_inflight_requests - len(self.inflight) - len(self.waiting)
                if lag > self.cfg.learner.max_staleness:
                    # Backpressure: samples from these weights would be dropped as stale; wait for new ones.
                    self.stop_event.wait(0.01)
                elif room > 0 and (not self.inflight or time.time() >= self._poll_after):
                    idle = not self.inflight and not self.waiting
                    taken = self._take_prompts(min(room, gcfg.prompts_per_batch),
                                               self.cfg.redis.block_ms if idle else None)
                    self.waiting += [(eid, task, time.time()) for eid, task in taken]
                    # An empty stream (the feeder at its in-flight cap) stays empty for a while: polling it between
                    # every engine step cost Redis thousands of reads a step at 64 generators (bench/simulate.py).
                    self._poll_after = time.time() + (PROMPT_POLL_S if not taken else 0.0)
                self._submit_ready(listener)
                self.publisher.collect()
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
            self.publisher.collect(block=True)
        finally:
            self.stop_event.set()
            self.publisher.shutdown()
            self.control.leave(self.id)
            self.reward.close()
            server.close()
            log.info("generator %s stopped", self.id)


def run(cfg: Config, generator_id: str | None = None) -> None:
    Generator(cfg, generator_id).run()

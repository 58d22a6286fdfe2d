"""`orz learner`: feed prompts, collect trajectory groups, train PPO, broadcast weights, repeat.

One step (ARCHITECTURE.md, "Data flow"): top the prompt stream up; read groups until `batch_prompts` fresh
ones are in hand (duplicates of a trained task are dropped; groups more than `max_staleness` versions old
are dropped and counted); run one PPO iteration; bump the policy version in Redis; broadcast the new
weights to the generators; ack the groups; write a metrics line; every `checkpoint_every` steps write a
resumable checkpoint (learner/checkpoint.py).

Under `torchrun --nproc-per-node K` (learner/parallel.py) rank 0 does all of the above and the other ranks
only train: each step they receive their share of the groups from rank 0 and join every collective.

Resuming (`--resume`) starts from the newest complete checkpoint: actor, critic, optimisers, schedules and
RNG states, the policy version, the dataset cursor and the set of tasks already trained or dropped. The
streams are reset and the prompts that were in flight at the checkpoint are fed again first, so the run
takes the same next prompts and trains no task twice. The generators must (re)join the weight-sync group
(`orz up --resume` restarts them); the learner sends them the resumed weights before the first step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import redis
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner import checkpoint as ckpt
from learner import parallel
from learner.batch import build_batch
from learner.critic import Critic
from learner.feeder import Feeder
from learner.models import critic_source, prepare
from learner.plot import plot_curves
from learner.trainer import PPOTrainer
from learner.weight_group import WeightGroup
from services.config import Config
from services.memory import HeapTrimmer
from services.metrics import MetricsServer
from services.plan import warn_if_it_will_not_fit
from services.protocol import PromptTask, ProtocolError, SamplingParams, TrajectoryGroup
from services.queue import Keys, StreamQueue
from services.redis_server import connect_cfg

log = logging.getLogger("orz.learner")

TRAJECTORY_GROUP = "learner"
# Groups per XREADGROUP: one reply of a whole ORZ batch (128 groups × ~1 MB) would hold Redis's one thread
# while it is written, stalling every generator's XADD behind it.
READ_CHUNK = 16


class LearnerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.step = Gauge("orz_learner_step", "last completed step", registry=r)
        self.version = Gauge("orz_learner_policy_version", "current policy version", registry=r)
        self.reward = Gauge("orz_learner_reward_mean", "mean reward of the last batch", registry=r)
        self.response_len = Gauge("orz_learner_response_length_mean", "mean response tokens", registry=r)
        self.kl = Gauge("orz_learner_behavior_kl", "KL(μ‖π_prox) estimate", registry=r)
        self.clipfrac = Gauge("orz_learner_clipfrac", "PPO clip fraction", registry=r)
        self.is_trunc = Gauge("orz_learner_is_truncated_fraction", "IS weights truncated at is_cap", registry=r)
        self.value_loss = Gauge("orz_learner_value_loss", "critic loss", registry=r)
        self.explained_var = Gauge("orz_learner_explained_variance", "critic explained variance", registry=r)
        self.padded_fraction = Gauge("orz_learner_padded_fraction", "share of the token slots the learner computed "
                                     "that were padding (length-bucketed micro-batches)", registry=r)
        self.staleness = Histogram("orz_learner_staleness_versions", "versions between sampling and training",
                                   registry=r, buckets=(0, 1, 2, 3, 4, 6, 8, 16))
        self.dropped = Counter("orz_learner_dropped_stale", "groups dropped as too stale", registry=r)
        self.duplicates = Counter("orz_learner_duplicate_groups", "duplicate groups of a consumed task",
                                  registry=r)
        self.step_time = Gauge("orz_learner_step_seconds", "step time split", ["phase"], registry=r)
        self.backlog = Gauge("orz_learner_queue_backlog", "stream entries not yet delivered to a consumer",
                             ["stream"], registry=self.registry)
        self.pending = Gauge("orz_learner_queue_pending", "stream entries delivered, not yet acknowledged",
                             ["stream"], registry=self.registry)
        self.eval_accuracy = Gauge("orz_learner_eval_accuracy", "accuracy on the in-training evaluation set "
                                   "(learner.eval_every)", registry=self.registry)
        self.redis_memory = Gauge("orz_learner_redis_used_memory_bytes", "Redis used_memory (INFO memory)",
                                  registry=self.registry)
        self.redis_maxmemory = Gauge("orz_learner_redis_maxmemory_bytes", "Redis maxmemory (0: no limit)",
                                     registry=self.registry)
        self.rejected = Counter("orz_learner_rejected_groups", "groups that decoded but do not answer the task "
                                "that was fed (dead-lettered; the task is fed again)", registry=r)
        self.redis_restarts = Counter("orz_learner_redis_restarts", "Redis restarts noticed (new run_id)",
                                      registry=r)
        self.refed_lost = Counter("orz_learner_refed_lost_prompts", "in-flight prompts found in neither stream "
                                  "after a Redis restart, fed again", registry=r)
        self.slow_peers = Counter("orz_learner_slow_peers_left_out", "generators left out of weight sync for a "
                                  "slow link (weight_sync.slow_peer_factor)", registry=r)
        self.last_step_ts = Gauge("orz_learner_last_step_timestamp_seconds", "time of the last step", registry=r)


class Learner:
    def __init__(self, cfg: Config, resume: bool | str = False) -> None:
        """`resume`: True continues from the newest checkpoint (which must exist); "auto" does so when one
        exists and starts fresh otherwise (a restarted Kubernetes pod)."""
        self.cfg = cfg
        lc = cfg.learner
        self.dtype = lc.compute_dtype(torch.cuda.is_available())
        self.dp = parallel.init_from_env(mixed_precision=self.dtype == "bfloat16")
        torch.manual_seed(lc.seed)
        torch.set_num_threads(lc.threads)
        self.run_path = cfg.run_path
        self.ckpt_root = self.run_path / "checkpoints"
        self.stop_event = threading.Event()
        self.version = 0
        self.step = 0
        self.resume_from: Path | None = None
        self.resume_state: dict | None = None
        if resume:
            self.resume_from = ckpt.latest(self.ckpt_root)
            if self.resume_from is None and resume != "auto":
                raise FileNotFoundError(f"--resume: no complete checkpoint under {self.ckpt_root}")
            if self.resume_from is None:
                log.info("--auto-resume: no checkpoint under %s yet; starting fresh", self.ckpt_root)
        if self.resume_from is not None:
            self.resume_state = ckpt.read_state(self.resume_from)
            self.version, self.step = int(self.resume_state["version"]), int(self.resume_state["step"])

        self._init_models()
        self.consumed: set[str] = set()
        if self.dp.is_main:
            self._init_rank0()

    def _init_models(self) -> None:
        """Actor (from the base model or the resumed checkpoint), critic, reference, trainer and tokenizer."""
        cfg, lc = self.cfg, self.cfg.learner
        base = cfg.model.path
        if not (base / "config.json").exists():
            raise FileNotFoundError(f"no base model at {base}: run `orz make-base-model --config ...` first")
        start = self.resume_from or base
        self.tokenizer = AutoTokenizer.from_pretrained(str(base))
        attn = lc.attn_implementation
        self.actor = AutoModelForCausalLM.from_pretrained(str(start), dtype=torch.float32, attn_implementation=attn)
        self.critic = None
        if lc.advantage == "gae":  # GRPO and RLOO need no critic (learner/advantages.py)
            self.critic = Critic.from_pretrained(critic_source(base, self.resume_from), attn)
        self.reference = None
        if lc.kl_coef > 0:
            self.reference = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32,
                                                                  attn_implementation=attn).eval()
            self.reference.requires_grad_(False)
        prepare(lc, self.dp, self.actor, self.critic, self.reference)
        self.trainer = PPOTrainer(lc, self.actor, self.critic, self.reference,
                                  self.dp.group if self.dp.enabled else None, cfg.sampling.temperature)
        if self.resume_from is not None:
            self._load_trainer_state()

    def _init_rank0(self) -> None:
        """Redis, the queues, the metrics, the run directory and the feeder: rank 0's share of the work."""
        cfg = self.cfg
        self.run_path.mkdir(parents=True, exist_ok=True)
        self.keys = Keys(cfg.namespace)
        self.redis = connect_cfg(cfg.redis)
        self.metrics = LearnerMetrics()
        self.prompts = StreamQueue(self.redis, self.keys.prompts, "generators", PromptTask, self.keys.dead)
        self.trajectories = StreamQueue(self.redis, self.keys.trajectories, TRAJECTORY_GROUP, TrajectoryGroup,
                                        self.keys.dead)
        if self.resume_state is not None:
            st = self.resume_state
            ckpt.truncate(self.run_path / "tasks.jsonl", st["feeder"]["ledger_offset"])
            ckpt.truncate(self.run_path / "metrics.jsonl", st["metrics_offset"])
            (self.run_path / "STOPPED").unlink(missing_ok=True)
            self.consumed = set(st["consumed"])
        else:  # a fresh run under an existing name starts its logs over
            for name in ("metrics.jsonl", "tasks.jsonl", "DONE", "STOPPED"):
                (self.run_path / name).unlink(missing_ok=True)
        self.feeder = Feeder(cfg, self.prompts, self.tokenizer, self.run_path / "tasks.jsonl")
        if self.resume_state is not None:
            self.feeder.restore(self.resume_state["feeder"])
            log.info("resuming from %s: step %d, version %d, %d prompts to feed again", self.resume_from,
                     self.step, self.version, len(self.resume_state["feeder"]["pending"]))

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _load_trainer_state(self) -> None:
        state = ckpt.load_trainer(self.resume_from) if self.dp.is_main else None
        tr = self.trainer
        parallel.load_optimizer_state(self.actor, tr.actor_opt, state and state["actor_opt"], self.dp)
        if tr.critic_opt is not None:
            parallel.load_optimizer_state(self.critic, tr.critic_opt, state and state["critic_opt"], self.dp)
        if self.dp.enabled:  # schedules and RNG states are tiny: every rank reads them from the file
            state = ckpt.load_trainer(self.resume_from)
        tr.actor_sched.load_state_dict(state["actor_sched"])
        if tr.critic_sched is not None:
            tr.critic_sched.load_state_dict(state["critic_sched"])
        ckpt.set_rng_state(state["rng"])

    def _checkpoint(self, actor_state: dict[str, torch.Tensor], metrics_offset: int) -> None:
        """Every rank joins (optimiser states are gathered); rank 0 writes and commits the directory."""
        tr = self.trainer
        trainer_state = {"actor_opt": parallel.optimizer_state(self.actor, tr.actor_opt, self.dp),
                         "actor_sched": tr.actor_sched.state_dict(), "rng": ckpt.rng_state()}
        critic_state = None
        if self.critic is not None:
            trainer_state["critic_opt"] = parallel.optimizer_state(self.critic, tr.critic_opt, self.dp)
            trainer_state["critic_sched"] = tr.critic_sched.state_dict()
            critic_state = parallel.full_state_dict(self.critic, self.dp)
        if not self.dp.is_main:
            return
        t0 = time.time()
        tmp = ckpt.tmp_dir_for(self.ckpt_root, self.step)
        self._save_models(tmp, actor_state, critic_state)
        ckpt.save_trainer(tmp, trainer_state)
        ckpt.write_state(tmp, {
            "step": self.step, "version": self.version, "feeder": self.feeder.state(),
            "consumed": sorted(self.consumed), "metrics_offset": metrics_offset,
            "advantage": self.cfg.learner.advantage,
        })
        final = ckpt.commit(tmp, self.ckpt_root, self.step, self.cfg.learner.keep_checkpoints)
        self._publish_checkpoint(final)
        log.info("checkpoint %s written in %.2f s", final, time.time() - t0)

    def _publish_checkpoint(self, path: Path) -> None:
        """Where a generator that joins late finds the newest weights on disk (generator/worker.py)."""
        self.redis.set(self.keys.checkpoint, json.dumps({"path": str(path.resolve()), "version": self.version}))

    def _save_models(self, path: Path, actor_state: dict, critic_state: dict | None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.actor.save_pretrained(path, state_dict=actor_state, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        if self.critic is not None:
            self.critic.save_pretrained(path / "critic", state_dict=critic_state)

    # -- rank 0: Redis, feeding, collecting -----------------------------------------------------------------
    def _reset_namespace(self) -> None:
        """Every run (fresh or resumed) starts from empty streams; a resumed one re-feeds its in-flight prompts."""
        self.redis.delete(self.keys.prompts, self.keys.trajectories, self.keys.policy_version,
                          self.keys.weights_meta, self.keys.checkpoint)
        self.prompts.ensure_group()
        self.trajectories.ensure_group()
        if self.resume_from is not None:
            self._publish_checkpoint(self.resume_from)

    def _weight_group(self) -> WeightGroup:
        # Global shapes without a gather: a DTensor's `shape` is the unsharded one.
        names, shapes = zip(*[(n, tuple(p.shape)) for n, p in self.actor.state_dict().items()])
        return WeightGroup(self.cfg, self.redis, self.keys, tuple(names), tuple(shapes),
                           on_slow=lambda _: self.metrics.slow_peers.inc())

    def _actor_state(self) -> dict[str, torch.Tensor]:
        return parallel.full_state_dict(self.actor, self.dp)

    def _collect(self, step: int, drop_log: list[str]) -> tuple[list[tuple[str, TrajectoryGroup]], list[str]]:
        """Reads until `batch_prompts` fresh groups are in hand; returns them and the entry ids to ack."""
        lc = self.cfg.learner
        batch: list[tuple[str, TrajectoryGroup]] = []
        to_ack: list[str] = []
        last_arrival = time.time()
        while len(batch) < lc.batch_prompts:
            if self.stop_event.is_set():
                raise KeyboardInterrupt
            self.feeder.top_up(self.version)
            self._watch_redis()
            entries = self._reclaim_own()
            entries += self.trajectories.read("learner-0", min(lc.batch_prompts - len(batch), READ_CHUNK),
                                              self.cfg.redis.block_ms)
            if time.time() - self._last_sync > 1.0:  # generators that joined (or came back) get the weights now
                self.weights.sync(self.version, self._latest_state)
                self._last_sync = time.time()
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
                if group.task_id in self.consumed:
                    # A reclaimed prompt can be generated twice (ARCHITECTURE.md, step 4); train it once.
                    self.metrics.duplicates.inc()
                    to_ack.append(entry_id)
                    continue
                task = self.feeder.pending.get(group.task_id)
                problem = invalid_group(group, task, self.version, self.vocab_size)
                if problem is not None:
                    # Well-formed on the wire but not an answer to what was fed: it must not reach the loss.
                    # The task (if it is one of ours) is fed again, so it is still trained exactly once.
                    self.trajectories.reject(entry_id, problem, group.to_bytes())
                    self.metrics.rejected.inc()
                    if task is not None:
                        self.feeder.refeed([group.task_id], self.version, reason=f"invalid group: {problem}")
                    continue
                self.consumed.add(group.task_id)
                if self.version - group.policy_version > lc.max_staleness:
                    self.metrics.dropped.inc()
                    drop_log.append(group.task_id)
                    self.feeder.record("dropped_stale", group.task_id, step)
                    to_ack.append(entry_id)
                    continue
                batch.append((entry_id, group))
        return batch, to_ack

    def _watch_redis(self) -> None:
        """Once a second: has Redis restarted (a new `run_id`)? Then put back what the restart may have lost.

        With AOF `everysec` a Redis *process* crash loses nothing acknowledged (the AOF is written before the
        reply); a machine crash loses the last second of writes, always a suffix. The learner's own state is
        the ledger of record: prompts it fed that are in neither stream any more are fed again; trajectories
        it already trained that reappear are duplicates; keys it owns are written again.
        """
        if time.time() - self._redis_checked < 1.0:
            return
        self._redis_checked = time.time()
        run_id = _text(self.redis.info("server")["run_id"])
        if self._redis_run_id is not None and run_id != self._redis_run_id:
            log.warning("Redis restarted (run_id %s → %s): reconciling the run's streams", self._redis_run_id[:8],
                        run_id[:8])
            self._reconcile()
        self._redis_run_id = run_id

    def _reconcile(self) -> None:
        t0 = time.time()
        self.prompts.ensure_group()
        self.trajectories.ensure_group()
        self.redis.set(self.keys.policy_version, self.version)
        self.weights.republish()
        lost = self.unaccounted()
        if lost:
            self.feeder.refeed(lost, self.version, reason="lost in a Redis restart")
        self.metrics.redis_restarts.inc()
        self.metrics.refed_lost.inc(len(lost))
        log.warning("after the Redis restart: %d in-flight prompt(s) were in neither stream and were fed again "
                    "(%.2f s)", len(lost), time.time() - t0)

    def unaccounted(self, in_hand: bool = False) -> list[str]:
        """In-flight tasks (fed, not trained, not in this step's hands) found in neither stream: lost.
        `in_hand`: count this step's tasks too (a stop mid-step: they were read, never trained, and their
        entries stay unacknowledged in the trajectory stream)."""
        present: set[str] = set()
        for stream, cls in ((self.keys.prompts, PromptTask), (self.keys.trajectories, TrajectoryGroup)):
            for _, fields in self.redis.xrange(stream):
                try:
                    present.add(cls.from_bytes(fields[b"m"]).task_id)
                except (KeyError, ProtocolError):
                    pass  # junk: the consumer dead-letters it when it reads it
        return [t for t in self.feeder.pending if (in_hand or t not in self.consumed) and t not in present]

    def _reclaim_own(self) -> list[tuple[str, TrajectoryGroup]]:
        """Entries delivered to the learner whose reply it never saw (the connection broke mid-reply and the
        read was retried, or Redis came back from its AOF) stay pending on it: take them back."""
        rc = self.cfg.redis
        if time.time() - self._last_reclaim < min(rc.reclaim_every_s, rc.claim_idle_ms / 2000):
            return []
        self._last_reclaim = time.time()
        return self.trajectories.reclaim("learner-0", rc.claim_idle_ms, READ_CHUNK)

    def _vocab_size(self) -> int:
        return int(self.actor.config.vocab_size)

    def _train(self, groups: list[TrajectoryGroup]) -> dict:
        """One PPO iteration on this rank's groups (bench/simulate.py replaces it with a cost model)."""
        return self.trainer.step(build_batch(groups, self.tokenizer.pad_token_id))

    def _shard_for_me(self, groups: list[TrajectoryGroup]) -> list[TrajectoryGroup]:
        if not self.dp.enabled:
            return groups
        share = parallel.split_groups(groups, self.dp.world)[self.dp.rank]
        return [groups[i] for i in share]

    # -- the loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        # Resumed: generators start from the base model, so rank 0 sends them the resumed weights first
        # (gathered here, on every rank, as a collective when sharded).
        self._latest_state = self._actor_state()  # what a generator joining before the next step receives
        if not self.dp.is_main:
            try:
                self._follow()
            finally:
                parallel.close(self.dp)
            return
        lc = self.cfg.learner
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        server = MetricsServer(self.metrics.registry, lc.metrics_port, host=lc.metrics_host,
                               health=lambda: {"status": "ok", "version": self.version, "step": self.step})
        log.info("learner: metrics on :%d, run dir %s, %s advantages, %d rank(s)", server.port, self.run_path,
                 lc.advantage, self.dp.world)
        self._reset_namespace()
        self.evaluator = InTrainingEval(self.cfg, self.tokenizer) if lc.eval_every else None
        self.weights = self._weight_group()
        self._last_sync = 0.0
        self._redis_checked, self._redis_run_id, self._last_reclaim = 0.0, None, time.time()
        self.vocab_size = self._vocab_size()
        self.heap = HeapTrimmer()
        self.redis.set(self.keys.policy_version, self.version)
        self.feeder.top_up(self.version)

        metrics_path = self.run_path / "metrics.jsonl"
        # Only the scalars the curves plot: full records (task ids, per-group lists) would grow without bound.
        history = [_scalars(json.loads(x)) for x in metrics_path.read_text().splitlines()] \
            if metrics_path.exists() else []
        metrics_file = metrics_path.open("a")
        dropped_total = history[-1]["dropped_stale_total"] if history else 0
        resumable_exit = False  # stopping to be resumed: generators must wait for the next group, not stop
        try:
            while self.step < lc.total_steps:
                step = self.step + 1
                t_start = time.time()
                drops: list[str] = []
                batch, to_ack = self._collect(step, drops)
                dropped_total += len(drops)
                t_collected = time.time()
                groups = [g for _, g in batch]
                parallel.send_command(self.dp, parallel.CMD_BATCH, groups)
                stats = self._train(self._shard_for_me(groups))
                self.version += 1
                self.step = step
                actor_state = self._actor_state()
                self.redis.set(self.keys.policy_version, self.version)
                self._latest_state = actor_state
                t_trained = time.time()
                broadcast_s = self.weights.sync(self.version, actor_state) or 0.0
                self._last_sync = time.time()
                self.trajectories.ack([eid for eid, _ in batch] + to_ack)
                # Acked entries would otherwise stay in Redis's memory for the whole run (~1 MB per group).
                self.trajectories.trim_acked()
                self.prompts.trim_acked()
                for _, g in batch:
                    self.feeder.record("trained", g.task_id, step)
                self.feeder.top_up(self.version)  # the next prompts go out before logging and checkpointing

                record = self._record(step, groups, stats, drops, dropped_total, t_start, t_collected, t_trained,
                                      broadcast_s)
                if lc.eval_every and (step % lc.eval_every == 0 or step == lc.total_steps):
                    record["eval_accuracy"] = self.evaluator.run(actor_state)
                    self.metrics.eval_accuracy.set(record["eval_accuracy"])
                metrics_file.write(json.dumps(_json_safe(record)) + "\n")
                metrics_file.flush()
                metrics_offset = metrics_file.tell()
                history.append(_scalars(record))
                self.heap.maybe()
                self._export(record)
                self._log(record, lc.total_steps)
                if lc.checkpoint_every and (step % lc.checkpoint_every == 0 or step == lc.total_steps):
                    parallel.send_command(self.dp, parallel.CMD_CHECKPOINT)
                    self._checkpoint(actor_state, metrics_offset)
                if step % 10 == 0:
                    plot_curves(history, self.run_path / "curves.png")
            parallel.send_command(self.dp, parallel.CMD_FINAL)
            self._save_models(self.run_path / "checkpoints" / "final", *self._final_states())
            self._write_accounting(self.run_path / "DONE")
        except KeyboardInterrupt:
            log.info("learner interrupted at version %d", self.version)
            self._write_accounting(self.run_path / "STOPPED")
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Every call already retried for redis.retry_s: Redis is gone, or this host is cut off from it.
            log.error("Redis unreachable for longer than redis.retry_s (%g s) during step %d (%s): stopping; "
                      "--resume continues from the newest checkpoint", self.cfg.redis.retry_s, self.step + 1, exc)
            resumable_exit = True
            raise SystemExit(3) from None
        finally:
            parallel.send_command(self.dp, parallel.CMD_STOP)
            if history:
                plot_curves(history, self.run_path / "curves.png")
            metrics_file.close()
            self.feeder.close()
            self.weights.stop(for_good=not resumable_exit)
            server.close()
            parallel.close(self.dp)

    def _write_accounting(self, path: Path) -> None:
        """Where every task stands when the learner ends (DONE) or is stopped (STOPPED): the tasks still in
        flight, and those of them found in neither stream (lost; the fault-injection tests require none).
        A task is in flight until it is trained or dropped (the feeder's `pending`), including those a step
        interrupted by the stop had read into its batch (`consumed`, but never trained)."""
        inflight = list(self.feeder.pending)
        try:
            unaccounted = self.unaccounted(in_hand=True)
        except Exception as exc:  # Redis gone at shutdown: say so rather than claim all is well
            unaccounted = [f"unknown: {exc}"]
        path.write_text(json.dumps({
            "steps": self.step, "version": self.version, "inflight": inflight, "unaccounted": unaccounted,
            "dead_lettered": self.trajectories.dead_lettered,
            "duplicates": int(self.metrics.duplicates._value.get()),
        }))

    def _final_states(self) -> tuple[dict, dict | None]:
        """Full actor and critic states; every rank calls this after CMD_STOP (a collective when sharded)."""
        critic = parallel.full_state_dict(self.critic, self.dp) if self.critic is not None else None
        return self._actor_state(), critic

    def _follow(self) -> None:
        """Ranks > 0: train on the shares rank 0 sends, join its gathers, until told to stop."""
        while True:
            cmd, groups = parallel.receive_command(self.dp)
            if cmd == parallel.CMD_STOP:
                return
            if cmd == parallel.CMD_FINAL:
                self._final_states()
                continue
            if cmd == parallel.CMD_CHECKPOINT:
                self._checkpoint({}, 0)
                continue
            self._train(self._shard_for_me(groups))
            self.version += 1
            self.step += 1
            self._actor_state()

    def _record(self, step, groups, stats, drops, dropped_total, t_start, t_collected, t_trained,
                broadcast_s) -> dict:
        rewards = np.array([s.reward for g in groups for s in g.samples])
        lengths = np.array([len(s.response_ids) for g in groups for s in g.samples])
        truncated = np.array([s.finish_reason == "length" for g in groups for s in g.samples])
        staleness = np.array([self.version - 1 - g.policy_version for g in groups])
        return {
            "step": step, "time": time.time(), "policy_version": self.version, "advantage": self.cfg.learner.advantage,
            "reward_mean": float(rewards.mean()), "response_len_mean": float(lengths.mean()),
            "truncated_frac": float(truncated.mean()),
            "staleness_mean": float(staleness.mean()), "staleness_max": int(staleness.max()),
            "dropped_stale": len(drops), "dropped_stale_total": dropped_total,
            "clipfrac": stats.get("clipfrac", 0.0), "approx_kl": stats.get("approx_kl", 0.0),
            "behavior_kl": stats.get("behavior_kl", 0.0),
            "is_truncated_frac": stats.get("is_truncated_frac", 0.0),
            "value_loss": stats.get("value_loss", float("nan")),
            "explained_variance": stats.get("explained_variance", float("nan")),
            "padded_fraction": stats.get("padded_fraction", 0.0),
            "wait_s": t_collected - t_start, "train_s": t_trained - t_collected,
            "broadcast_s": broadcast_s, "step_time_s": time.time() - t_start,
            "inflight_prompts": self.feeder.inflight, "weight_sync_members": list(self.weights.members),
            "group_versions": [g.policy_version for g in groups],
            "group_versions_last": [g.policy_version_last for g in groups],
            "generator_ids": sorted({g.generator_id for g in groups}),
            "generator_activity": self._generator_activity(),
            "group_generators": [g.generator_id for g in groups],
            "task_ids": [g.task_id for g in groups],
            "stats": stats,
        }

    def _generator_activity(self) -> dict[str, list[float]]:
        """Each live generator's cumulative engine-busy seconds and the time it reported them (its heartbeat):
        busy fraction over an interval = Δbusy_s / Δts (bench/async_e2e.py)."""
        out = {}
        try:
            for gid, raw in self.redis.hgetall(self.keys.generators).items():
                beat = json.loads(raw)
                out[_text(gid)] = [float(beat["busy_s"]), float(beat["ts"])]
        except (ValueError, KeyError, TypeError):  # a generator of an older build: no busy time
            pass
        return out

    def _log(self, r: dict, total: int) -> None:
        log.info(
            "step %d/%d v%d reward %.3f len %.1f staleness %.2f dropped %d clipfrac %.3f kl(mu|prox) %.4f "
            "vloss %.4f step %.2fs (wait %.2f train %.2f bcast %.3f)",
            r["step"], total, r["policy_version"], r["reward_mean"], r["response_len_mean"], r["staleness_mean"],
            r["dropped_stale"], r["clipfrac"], r["behavior_kl"], r["value_loss"], r["step_time_s"], r["wait_s"],
            r["train_s"], r["broadcast_s"],
        )

    def _export(self, r: dict) -> None:
        m = self.metrics
        m.step.set(r["step"])
        m.version.set(r["policy_version"])
        m.reward.set(r["reward_mean"])
        m.response_len.set(r["response_len_mean"])
        m.kl.set(r["behavior_kl"])
        m.clipfrac.set(r["clipfrac"])
        m.is_trunc.set(r["is_truncated_frac"])
        m.value_loss.set(r["value_loss"])
        m.explained_var.set(r["explained_variance"])
        m.padded_fraction.set(r["padded_fraction"])
        for v in r["group_versions"]:
            m.staleness.observe(r["policy_version"] - 1 - v)
        for phase in ("wait_s", "train_s", "broadcast_s", "step_time_s"):
            m.step_time.labels(phase=phase.removesuffix("_s")).set(r[phase])
        m.last_step_ts.set(time.time())
        self._export_queues()

    def _export_queues(self) -> None:
        """Queue depths (what generator autoscaling keys on) and Redis memory; best effort."""
        m = self.metrics
        try:
            for name, key, group in (("prompts", self.keys.prompts, "generators"),
                                     ("trajectories", self.keys.trajectories, TRAJECTORY_GROUP)):
                info = next((g for g in self.redis.xinfo_groups(key) if _text(g["name"]) == group), None)
                if info is not None:
                    m.backlog.labels(stream=name).set(info.get("lag") or 0)
                    m.pending.labels(stream=name).set(info["pending"])
            mem = self.redis.info("memory")
            m.redis_memory.set(mem["used_memory"])
            m.redis_maxmemory.set(mem.get("maxmemory", 0))
        except Exception as exc:  # metrics must never stop training
            log.debug("queue metrics unavailable: %s", exc)


class InTrainingEval:
    """Accuracy of the current policy every `learner.eval_every` steps, on rank 0: the toy task's held-out
    problems (or the first `eval_size` of `eval_bench`), one sample each at `eval.temperature`, generated by
    the transformers engine with the step's weights copied in, graded by the reward server."""

    def __init__(self, cfg: Config, tokenizer) -> None:
        from generator.hf_engine import TransformersEngine
        from generator.reward_client import RewardClient
        from services.datasets import bench_records, render, template
        from services.tasks import all_problems, eval_set

        lc, tc = cfg.learner, cfg.task
        if not cfg.reward.url:
            raise ValueError("learner.eval_every needs reward.url")
        if lc.eval_bench:
            bench, records = bench_records(lc.eval_bench, lc.eval_size)
            text = template(tc.template)
            self.items = [(render(text, r.question), r.answer) for r in records]
            self.task_type = bench.task_type
        else:
            problems = eval_set(all_problems(tc.min_terms, tc.max_terms, tc.max_operand), lc.eval_size, tc.seed)
            self.items = [(p.prompt, str(p.answer)) for p in problems]
            self.task_type = tc.task_type
        self.ids = [tokenizer.encode(prompt, add_special_tokens=False) for prompt, _ in self.items]
        gc, ec = cfg.generator, cfg.eval
        self.engine = TransformersEngine(cfg.model.path, dtype="float32", max_model_len=gc.max_model_len,
                                         seed=lc.seed, threads=lc.threads, max_num_seqs=gc.max_num_seqs)
        self.params = SamplingParams(ec.temperature, 1.0, ec.max_tokens, tuple(cfg.sampling.stop))
        self.client = RewardClient(cfg.reward.url, cfg.reward.request_timeout_s, cfg.reward.token, cfg.reward.retry_s)

    def run(self, actor_state: dict) -> float:
        from generator.reward_client import GradeItem

        t0 = time.time()
        self.engine.load_weights((name, t.detach().float().cpu()) for name, t in actor_state.items())
        outs = self.engine.generate(self.ids, [self.params] * len(self.ids), [1] * len(self.ids))
        items = [GradeItem(str(i), comps[0].text, answer, self.task_type, comps[0].finish_reason == "length")
                 for i, ((_, answer), comps) in enumerate(zip(self.items, outs))]
        accuracy = sum(g.reward for g in self.client.grade(items)) / len(items)
        log.info("in-training eval: accuracy %.3f on %d problems (%.1f s)", accuracy, len(items), time.time() - t0)
        return accuracy


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
    for i, s in enumerate(group.samples):
        if len(s.response_ids) > task.sampling.max_tokens:
            return f"sample {i}: {len(s.response_ids)} tokens, max_tokens is {task.sampling.max_tokens}"
        if len(s.response_ids) and (s.response_ids.min() < 0 or s.response_ids.max() >= vocab_size):
            return f"sample {i}: token id outside the vocabulary [0, {vocab_size})"
        if s.finish_reason not in ("stop", "length", "abort"):
            return f"sample {i}: unknown finish_reason {s.finish_reason[:40]!r}"
        if s.verdict == "error":  # generators grade such samples again; one that published it has a bug
            return f"sample {i}: graded `error` (a fault of the grader), published as a reward"
    return None


def _scalars(record: dict) -> dict:
    return {k: v for k, v in record.items() if not isinstance(v, (list, dict))}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _json_safe(value):
    """NaN/inf (e.g. explained variance of a batch whose returns are all equal) become null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def run(cfg: Config, resume: bool | str = False) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        warn_if_it_will_not_fit(cfg, log)
    learner = Learner(cfg, resume)
    learner.run()
    parallel.end_process(learner.dp)

"""`orz learner`: feed prompts, collect trajectory groups, train PPO-GAE, broadcast weights, repeat.

One step (ARCHITECTURE.md, "Data flow"): top the prompt stream up; read groups until `batch_prompts` fresh
ones are in hand (duplicates of a trained task are dropped; groups more than `max_staleness` versions old
are dropped and counted); run one PPO iteration; bump the policy version in Redis; broadcast the new
weights to the generators; ack the groups; write a metrics line.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner.batch import build_batch
from learner.critic import Critic
from learner.feeder import Feeder
from learner.plot import plot_curves
from learner.trainer import PPOTrainer
from services.config import Config
from services.metrics import MetricsServer, free_port
from services.protocol import PromptTask, TrajectoryGroup, WeightsAnnouncement
from services.queue import Keys, StreamQueue
from services.redis_server import connect
from services.weight_sync import WeightSender, resolve_backend

log = logging.getLogger("orz.learner")

TRAJECTORY_GROUP = "learner"
MAX_TOKENS_PER_MICROBATCH = 16384


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
        self.staleness = Histogram("orz_learner_staleness_versions", "versions between sampling and training",
                                   registry=r, buckets=(0, 1, 2, 3, 4, 6, 8, 16))
        self.dropped = Counter("orz_learner_dropped_stale", "groups dropped as too stale", registry=r)
        self.duplicates = Counter("orz_learner_duplicate_groups", "duplicate groups of a consumed task",
                                  registry=r)
        self.step_time = Gauge("orz_learner_step_seconds", "step time split", ["phase"], registry=r)
        self.last_step_ts = Gauge("orz_learner_last_step_timestamp_seconds", "time of the last step", registry=r)


class Learner:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        lc = cfg.learner
        torch.manual_seed(lc.seed)
        torch.set_num_threads(lc.threads)
        self.run_path = cfg.run_path
        self.run_path.mkdir(parents=True, exist_ok=True)
        self.keys = Keys(cfg.namespace)
        self.redis = connect(cfg.redis.url, cfg.redis.socket_timeout_s)
        self.metrics = LearnerMetrics()
        self.stop_event = threading.Event()

        base = cfg.model.path
        if not (base / "config.json").exists():
            raise FileNotFoundError(f"no base model at {base}: run `orz make-base-model --config ...` first")
        self.tokenizer = AutoTokenizer.from_pretrained(str(base))
        self.actor = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        self.critic = Critic.from_pretrained(base)
        self.trainer = PPOTrainer(lc, self.actor, self.critic, MAX_TOKENS_PER_MICROBATCH)
        self.version = 0

        self.prompts = StreamQueue(self.redis, self.keys.prompts, "generators", PromptTask, self.keys.dead)
        self.trajectories = StreamQueue(self.redis, self.keys.trajectories, TRAJECTORY_GROUP, TrajectoryGroup,
                                        self.keys.dead)
        self.feeder = Feeder(cfg, self.prompts, self.tokenizer, self.run_path / "tasks.jsonl")
        self.consumed: set[str] = set()

    def _reset_namespace(self) -> None:
        """A fresh run starts from empty streams (resuming is a later feature)."""
        self.redis.delete(self.keys.prompts, self.keys.trajectories, self.keys.policy_version,
                          self.keys.weights_meta, self.keys.generators)
        self.prompts.ensure_group()
        self.trajectories.ensure_group()

    def _announce(self) -> WeightSender:
        ws = self.cfg.weight_sync
        port = ws.port or free_port(ws.host)
        names, shapes = zip(*[(n, tuple(p.shape)) for n, p in self.actor.state_dict().items()])
        ann = WeightsAnnouncement(
            rendezvous=f"tcp://{ws.host}:{port}", world_size=1 + self.cfg.generator.num,
            backend=resolve_backend(ws.backend), names=tuple(names), shapes=tuple(shapes), dtype="float32",
            bucket_bytes=ws.bucket_mb * 2**20, session=uuid.uuid4().hex,
        )
        sender = WeightSender(ann, ws.timeout_s)
        self.redis.set(self.keys.weights_meta, ann.to_bytes())
        self.redis.publish(self.keys.weights, ann.to_bytes())
        return sender

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
            entries = self.trajectories.read("learner-0", lc.batch_prompts - len(batch), self.cfg.redis.block_ms)
            if not entries:
                if time.time() - last_arrival > lc.wait_timeout_s:
                    raise TimeoutError(f"no trajectories for {lc.wait_timeout_s:.0f} s: are generators running?")
                continue
            last_arrival = time.time()
            for entry_id, group in entries:
                if group.task_id in self.consumed:
                    # A reclaimed prompt can be generated twice (ARCHITECTURE.md, step 4); train it once.
                    self.metrics.duplicates.inc()
                    self.redis.xack(self.keys.trajectories, TRAJECTORY_GROUP, entry_id)
                    continue
                self.consumed.add(group.task_id)
                if self.version - group.policy_version > lc.max_staleness:
                    self.feeder.dropped += 1
                    self.metrics.dropped.inc()
                    drop_log.append(group.task_id)
                    self.feeder.record("dropped_stale", group.task_id, step)
                    to_ack.append(entry_id)
                    continue
                batch.append((entry_id, group))
        return batch, to_ack

    def run(self) -> None:
        cfg, lc = self.cfg, self.cfg.learner
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        server = MetricsServer(self.metrics.registry, lc.metrics_port,
                               health=lambda: {"status": "ok", "version": self.version})
        log.info("learner: metrics on :%d, run dir %s", server.port, self.run_path)
        self._reset_namespace()
        sender = self._announce()
        self.redis.set(self.keys.policy_version, self.version)
        self.feeder.top_up(self.version)
        log.info("waiting for %d generators to join the weight-sync group", cfg.generator.num)
        joined = threading.Thread(target=sender.connect, name="weight-sync-connect", daemon=True)
        joined.start()

        metrics_file = (self.run_path / "metrics.jsonl").open("w")
        history: list[dict] = []
        dropped_total = 0
        try:
            for step in range(1, lc.total_steps + 1):
                t_start = time.time()
                drops: list[str] = []
                batch, to_ack = self._collect(step, drops)
                dropped_total += len(drops)
                t_collected = time.time()
                groups = [g for _, g in batch]
                rollout = build_batch(groups, self.tokenizer.pad_token_id)
                stats = self.trainer.step(rollout)
                self.version += 1
                self.redis.set(self.keys.policy_version, self.version)
                t_trained = time.time()
                joined.join(timeout=cfg.weight_sync.timeout_s)
                if joined.is_alive():
                    raise TimeoutError("generators did not join the weight-sync group in time")
                broadcast_s = sender.send(self.version, dict(self.actor.state_dict()))
                self.trajectories.ack([eid for eid, _ in batch] + to_ack)
                for _, g in batch:
                    self.feeder.record("trained", g.task_id, step)
                self.feeder.trained += len(batch)

                rewards = np.array([s.reward for g in groups for s in g.samples])
                lengths = np.array([len(s.response_ids) for g in groups for s in g.samples])
                staleness = np.array([self.version - 1 - g.policy_version for g in groups])
                record = {
                    "step": step, "policy_version": self.version,
                    "reward_mean": float(rewards.mean()), "response_len_mean": float(lengths.mean()),
                    "truncated_frac": float(rollout.truncated.float().mean()),
                    "staleness_mean": float(staleness.mean()), "staleness_max": int(staleness.max()),
                    "dropped_stale": len(drops), "dropped_stale_total": dropped_total,
                    "clipfrac": stats.get("clipfrac", 0.0), "approx_kl": stats.get("approx_kl", 0.0),
                    "behavior_kl": stats.get("behavior_kl", 0.0),
                    "is_truncated_frac": stats.get("is_truncated_frac", 0.0),
                    "value_loss": stats.get("value_loss", 0.0),
                    "explained_variance": stats.get("explained_variance", 0.0),
                    "wait_s": t_collected - t_start, "train_s": t_trained - t_collected,
                    "broadcast_s": broadcast_s, "step_time_s": time.time() - t_start,
                    "inflight_prompts": self.feeder.inflight,
                    "group_versions": [g.policy_version for g in groups],
                    "generator_ids": sorted({g.generator_id for g in groups}),
                    "task_ids": [g.task_id for g in groups],
                    "stats": stats,
                }
                metrics_file.write(json.dumps(_json_safe(record)) + "\n")
                metrics_file.flush()
                history.append(record)
                self._export(record)
                log.info(
                    "step %d/%d v%d reward %.3f len %.1f staleness %.2f dropped %d clipfrac %.3f kl(mu|prox) %.4f "
                    "vloss %.4f step %.2fs (wait %.2f train %.2f bcast %.3f)",
                    step, lc.total_steps, self.version, record["reward_mean"], record["response_len_mean"],
                    record["staleness_mean"], len(drops), record["clipfrac"], record["behavior_kl"],
                    record["value_loss"], record["step_time_s"], record["wait_s"], record["train_s"], broadcast_s,
                )
                if step % 10 == 0:
                    plot_curves(history, self.run_path / "curves.png")
            self._save(self.run_path / "checkpoints" / "final")
            (self.run_path / "DONE").write_text(json.dumps({"steps": lc.total_steps, "version": self.version}))
        except KeyboardInterrupt:
            log.info("learner interrupted at version %d", self.version)
        finally:
            if history:
                plot_curves(history, self.run_path / "curves.png")
            metrics_file.close()
            self.feeder.close()
            sender.stop()
            server.close()

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
        for v in r["group_versions"]:
            m.staleness.observe(r["policy_version"] - 1 - v)
        for phase in ("wait_s", "train_s", "broadcast_s", "step_time_s"):
            m.step_time.labels(phase=phase.removesuffix("_s")).set(r[phase])
        m.last_step_ts.set(time.time())

    def _save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.actor.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        self.critic.save_pretrained(path / "critic")
        log.info("checkpoint (HF format) written to %s", path)


def _json_safe(value):
    """NaN/inf (e.g. explained variance of a batch whose returns are all equal) become null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def run(cfg: Config) -> None:
    Learner(cfg).run()

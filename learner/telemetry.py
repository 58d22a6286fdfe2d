"""The learner's telemetry: its Prometheus metrics, the record each step appends to metrics.jsonl, and the
log line it prints (docs/architecture.md, "Metrics")."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import TypedDict

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.control import ControlPlane
from services.protocol import TrajectoryGroup
from services.queue import StreamQueue

log = logging.getLogger("orz.learner")


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
        self.is_masked = Gauge("orz_learner_is_masked_fraction", "tokens dropped by masked IS (learner.is_mode: mask)",
                               registry=r)
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
        self.filtered = Counter("orz_learner_filtered_groups", "groups not trained on for carrying no signal "
                                "(learner.filter_groups)", registry=r)
        self.short_batches = Counter("orz_learner_short_batches", "steps that trained on fewer than batch_prompts "
                                     "groups because learner.max_oversample was reached", registry=r)
        self.tracking_errors = Counter("orz_learner_tracking_errors", "steps an experiment tracker failed to log "
                                       "(logging.sinks)", ["sink"], registry=r)
        self.source_reward = Gauge("orz_learner_source_reward_mean", "mean reward of the last batch's groups from "
                                   "each task.sources entry", ["source"], registry=r)
        self.source_groups = Counter("orz_learner_source_groups", "groups trained, by task.sources entry",
                                     ["source"], registry=r)
        self.source_eval = Gauge("orz_learner_source_eval_accuracy", "in-training eval accuracy by task.sources "
                                 "entry (its eval_path)", ["source"], registry=r)
        self.last_step_ts = Gauge("orz_learner_last_step_timestamp_seconds", "time of the last step", registry=r)


    def init_labels(self, sources: list[str], sinks: list[str]) -> None:
        """Every labelled series exists from the start: per source (NaN until its first batch or evaluation),
        and the failure count of each experiment tracker (0)."""
        for label in sources:
            self.source_reward.labels(source=label).set(float("nan"))
            self.source_eval.labels(source=label).set(float("nan"))
            self.source_groups.labels(source=label)
        for sink in sinks:
            if sink != "jsonl":  # every tracker, configured or not: a dashboard's query finds its series
                self.tracking_errors.labels(sink=sink)


class StepRecord(TypedDict, total=False):
    """One line of metrics.jsonl: a learner step (`eval_*`: the in-training evaluation of that step's weights,
    learner/evaluation.py; `learner_cpu_s`, `redis_cpu_s`: the simulation's overhead figures)."""

    step: int
    time: float
    policy_version: int  # after the step
    advantage: str
    reward_mean: float
    response_len_mean: float
    truncated_frac: float
    staleness_mean: float
    staleness_max: int
    dropped_stale: int
    dropped_stale_total: int
    clipfrac: float
    approx_kl: float
    behavior_kl: float
    is_truncated_frac: float
    is_masked_frac: float
    value_loss: float
    explained_variance: float
    padded_fraction: float
    wait_s: float
    train_s: float
    broadcast_s: float
    step_time_s: float
    inflight_prompts: int
    weight_sync_members: list[str]
    group_versions: list[int]
    group_versions_last: list[int]
    generator_ids: list[str]
    generator_activity: dict[str, list[float]]
    group_generators: list[str]
    task_ids: list[str]
    stats: dict
    eval_accuracy: float
    eval_problems: int
    eval_policy_versions: list[int]
    eval_truncated_frac: float
    eval_missing: int
    learner_cpu_s: float
    redis_cpu_s: float
    filtered_groups: int  # this step (learner.filter_groups)
    filtered_groups_total: int
    sources: dict[str, dict]  # per source (learner/mixture.py, source_of): this step's reward_mean and groups
    eval_source_accuracy: dict[str, float]  # task.sources with eval_path: the in-training eval per source


def step_record(step: int, version: int, advantage: str, groups: Sequence[TrajectoryGroup], stats: dict,
                drops: list[str], dropped_total: int, times: tuple[float, float, float], broadcast_s: float,
                inflight: int, members: Sequence[str], activity: dict[str, list[float]]) -> StepRecord:
    """One step's line of metrics.jsonl. `version`: the policy version after the step; `times`: when the
    step started, when its batch was in hand, when training ended."""
    t_start, t_collected, t_trained = times
    rewards = np.array([s.reward for g in groups for s in g.samples])
    lengths = np.array([len(s.response_ids) for g in groups for s in g.samples])
    truncated = np.array([s.finish_reason == "length" for g in groups for s in g.samples])
    staleness = np.array([version - 1 - g.policy_version for g in groups])
    return StepRecord(**{
        "step": step, "time": time.time(), "policy_version": version, "advantage": advantage,
        "reward_mean": float(rewards.mean()), "response_len_mean": float(lengths.mean()),
        "truncated_frac": float(truncated.mean()),
        "staleness_mean": float(staleness.mean()), "staleness_max": int(staleness.max()),
        "dropped_stale": len(drops), "dropped_stale_total": dropped_total,
        "clipfrac": stats.get("clipfrac", 0.0), "approx_kl": stats.get("approx_kl", 0.0),
        "behavior_kl": stats.get("behavior_kl", 0.0),
        "is_truncated_frac": stats.get("is_truncated_frac", 0.0),
        "is_masked_frac": stats.get("is_masked_frac", 0.0),
        "value_loss": stats.get("value_loss", float("nan")),
        "explained_variance": stats.get("explained_variance", float("nan")),
        "padded_fraction": stats.get("padded_fraction", 0.0),
        "wait_s": t_collected - t_start, "train_s": t_trained - t_collected,
        "broadcast_s": broadcast_s, "step_time_s": time.time() - t_start,
        "inflight_prompts": inflight, "weight_sync_members": list(members),
        "group_versions": [g.policy_version for g in groups],
        "group_versions_last": [g.policy_version_last for g in groups],
        "generator_ids": sorted({g.generator_id for g in groups}),
        "generator_activity": activity,
        "group_generators": [g.generator_id for g in groups],
        "task_ids": [g.task_id for g in groups],
        "stats": stats,
    })


def source_figures(groups: Sequence[TrajectoryGroup], source_of) -> dict[str, dict]:
    """Per source of the batch's groups: their mean reward and how many there were."""
    rewards: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for g in groups:
        label = source_of(g.task_id)
        rewards.setdefault(label, []).extend(s.reward for s in g.samples)
        counts[label] = counts.get(label, 0) + 1
    return {label: {"reward_mean": float(np.mean(r)), "groups": counts[label]} for label, r in sorted(rewards.items())}


def generator_activity(control: ControlPlane) -> dict[str, list[float]]:
    """Each live generator's cumulative engine-busy seconds and the time it reported them (its heartbeat):
    busy fraction over an interval = Δbusy_s / Δts (bench/async_e2e.py)."""
    return {gid: [beat.busy_s, beat.ts] for gid, beat in control.heartbeats().items()}


def log_step(r: dict, total: int) -> None:
    log.info(
        "step %d/%d v%d reward %.3f len %.1f staleness %.2f dropped %d clipfrac %.3f kl(mu|prox) %.4f "
        "vloss %.4f step %.2fs (wait %.2f train %.2f bcast %.3f)",
        r["step"], total, r["policy_version"], r["reward_mean"], r["response_len_mean"], r["staleness_mean"],
        r["dropped_stale"], r["clipfrac"], r["behavior_kl"], r["value_loss"], r["step_time_s"], r["wait_s"],
        r["train_s"], r["broadcast_s"],
    )


def export(m: LearnerMetrics, r: dict) -> None:
    m.step.set(r["step"])
    m.version.set(r["policy_version"])
    m.reward.set(r["reward_mean"])
    m.response_len.set(r["response_len_mean"])
    m.kl.set(r["behavior_kl"])
    m.clipfrac.set(r["clipfrac"])
    m.is_trunc.set(r["is_truncated_frac"])
    m.is_masked.set(r["is_masked_frac"])
    m.value_loss.set(r["value_loss"])
    m.explained_var.set(r["explained_variance"])
    m.padded_fraction.set(r["padded_fraction"])
    for v in r["group_versions"]:
        m.staleness.observe(r["policy_version"] - 1 - v)
    for phase in ("wait_s", "train_s", "broadcast_s", "step_time_s"):
        m.step_time.labels(phase=phase.removesuffix("_s")).set(r[phase])
    for label, figures in r.get("sources", {}).items():
        m.source_reward.labels(source=label).set(figures["reward_mean"])
        m.source_groups.labels(source=label).inc(figures["groups"])
    m.last_step_ts.set(time.time())


def export_queues(m: LearnerMetrics, queues: dict[str, StreamQueue], control: ControlPlane) -> None:
    """Queue depths (what generator autoscaling keys on) and Redis memory; best effort."""
    try:
        for name, queue in queues.items():
            m.backlog.labels(stream=name).set(queue.backlog())
            m.pending.labels(stream=name).set(queue.pending_count())
        used, limit = control.memory()
        m.redis_memory.set(used)
        m.redis_maxmemory.set(limit)
    except Exception as exc:  # metrics must never stop training
        log.debug("queue metrics unavailable: %s", exc)


def scalars(record: dict) -> dict:
    """The scalars of a record (what the curves plot): task ids and per-group lists would grow without bound."""
    return {k: v for k, v in record.items() if not isinstance(v, (list, dict))}


def json_safe(value):
    """NaN/inf (e.g. explained variance of a batch whose returns are all equal) become null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value

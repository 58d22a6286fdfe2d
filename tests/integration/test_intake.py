"""The learner's intake against a real Redis, without a learner around it: what enters a batch (fresh groups),
what is dropped and counted (duplicates, stale groups), what is dead-lettered and fed again (a group that
does not answer what was fed), and how it accounts for tasks after a stop or a Redis restart."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from learner.feeder import Feeder
from learner.intake import Intake
from learner.telemetry import LearnerMetrics
from services.config import Config
from services.control import ControlPlane, Keys
from services.dead_letter import dead_letters
from services.protocol import PromptTask, Sample, TrajectoryGroup
from services.queue import prompt_queue, trajectory_queue
from services.redis_client import connect
from tests.integration.test_feeder import _tokenizer


def _answer(task: PromptTask, version: int, n: int | None = None, prompt_ids=None) -> TrajectoryGroup:
    samples = tuple(Sample(np.array([5, 6], dtype=np.int32), np.array([-0.1, -0.2], dtype=np.float32), 1.0, "stop",
                           "x") for _ in range(n or task.n_samples))
    ids = np.asarray(task.prompt_ids if prompt_ids is None else prompt_ids, dtype=np.int32)
    return TrajectoryGroup(task.task_id, ids, samples, version, "gen-0", version)


@pytest.fixture
def parts(redis_url: str, tmp_path: Path):
    cfg = Config.model_validate({"run_name": f"intake-{tmp_path.name}",
                                 "learner": {"batch_prompts": 3, "max_staleness": 1, "n_samples": 2,
                                             "wait_timeout_s": 30},
                                 "redis": {"block_ms": 50, "reclaim_every_s": 0.5}})
    client = connect(redis_url)
    keys = Keys(cfg.namespace)
    prompts, trajectories = prompt_queue(client, keys), trajectory_queue(client, keys)
    for q in (prompts, trajectories):
        q.ensure_group()
    feeder = Feeder(cfg, prompts, _tokenizer(), tmp_path / "tasks.jsonl")
    metrics = LearnerMetrics()
    intake = Intake(cfg, prompts, trajectories, feeder, ControlPlane(client, keys), metrics, threading.Event())
    intake.vocab_size = 1000
    yield cfg, client, keys, prompts, trajectories, feeder, intake, metrics
    feeder.close()


def test_a_batch_of_fresh_groups_and_what_is_left_out(parts) -> None:
    cfg, client, keys, prompts, trajectories, feeder, intake, metrics = parts
    feeder.top_up(version=2)  # 6 prompts: batch 3 × (max_staleness 1 + 1)
    tasks = [t for _, t in prompts.read("gen-0", 10)]
    first, second, third, fourth, fifth, sixth = tasks
    trajectories.add_many([
        _answer(first, 2),
        _answer(first, 2),  # a duplicate (a reclaimed prompt generated twice): dropped, acked with the batch
        _answer(second, 0),  # 2 versions old with max_staleness 1: dropped as stale and counted
        _answer(third, 2, n=1),  # 1 sample where 2 were asked for: dead-lettered, its task fed again
        _answer(fourth, 1),  # 1 version old: fresh enough
        _answer(fifth, 2, prompt_ids=[1, 2]),  # answers another prompt: dead-lettered, fed again
        _answer(sixth, 2),
    ])
    drops: list[str] = []
    waits: list[int] = []
    batch, to_ack = intake.collect(step=3, version=2, drop_log=drops, on_wait=lambda: waits.append(1),
                                   on_redis_restart=lambda: None)
    assert [g.task_id for _, g in batch] == [first.task_id, fourth.task_id, sixth.task_id]
    assert drops == [second.task_id] and len(to_ack) == 2  # the duplicate's and the stale group's entries
    assert waits  # the learner got its turn between reads
    assert metrics.duplicates._value.get() == 1 and metrics.dropped._value.get() == 1
    assert metrics.rejected._value.get() == 2
    reasons = sorted(d.reason for d in dead_letters(client, keys.dead))
    assert reasons[0].startswith("1 samples, 2 were asked for") and "prompt_ids differ" in reasons[1]
    assert intake.consumed == {first.task_id, second.task_id, fourth.task_id, sixth.task_id}
    # Stopped now (the batch read, never trained): every task not trained or dropped is in flight and found.
    # The stale drop freed one slot, which the feeder filled with a new prompt while the step waited.
    assert {t.task_id for t in (first, third, fourth, fifth, sixth)} < set(feeder.pending)
    assert len(feeder.pending) == 6 and intake.unaccounted(in_hand=True) == []
    # Lost from both streams (what a Redis restart can do): the batch's tasks are in hand, the rest is lost.
    client.delete(keys.prompts, keys.trajectories)
    in_hand = {first.task_id, fourth.task_id, sixth.task_id}
    assert set(intake.unaccounted()) == set(feeder.pending) - in_hand
    assert set(intake.unaccounted(in_hand=True)) == set(feeder.pending)


def test_a_redis_restart_feeds_the_lost_prompts_again(parts) -> None:
    cfg, client, keys, prompts, trajectories, feeder, intake, metrics = parts
    feeder.top_up(version=0)
    rewritten: list[int] = []
    intake.watch_redis(0, lambda: rewritten.append(1))  # first look: remembers the server's run_id
    client.delete(keys.prompts)  # lost, as a restart from an older AOF loses a suffix
    intake._redis_run_id = "0" * 40  # as if the server came back with another run_id
    intake._redis_checked = 0.0
    intake.watch_redis(0, lambda: rewritten.append(1))
    assert rewritten == [1] and metrics.redis_restarts._value.get() == 1
    assert metrics.refed_lost._value.get() == 6
    assert prompts.length() == 6  # fed again, under the same task ids
    assert {t.task_id for _, t in prompts.read("gen-0", 10)} == set(feeder.pending)


def _mixed(task: PromptTask, version: int, rewards: list[float]) -> TrajectoryGroup:
    group = _answer(task, version)
    samples = tuple(Sample(s.response_ids, s.logprobs, r, s.finish_reason, s.text) for s, r in
                    zip(group.samples, rewards, strict=True))
    return TrajectoryGroup(group.task_id, group.prompt_ids, samples, version, "gen-0", version)


def test_zero_variance_groups_are_filtered_and_the_batch_still_fills(parts) -> None:
    cfg, client, keys, prompts, trajectories, feeder, intake, metrics = parts
    cfg.learner.filter_groups = "zero_variance"
    feeder.top_up(version=0)
    answered: set[str] = set()

    def answer_all() -> None:  # a scripted generator: two prompts in three get all-equal rewards
        for _, task in prompts.read("gen-0", 50):
            if task.task_id not in answered:
                answered.add(task.task_id)
                same = len(answered) % 3 != 0
                trajectories.add(_mixed(task, 0, [1.0, 1.0] if same else [0.0, 1.0]))

    answer_all()
    filtered: list[str] = []
    batch, to_ack = intake.collect(step=1, version=0, drop_log=[], on_wait=answer_all,
                                   on_redis_restart=lambda: None, filter_log=filtered)
    assert len(batch) == cfg.learner.batch_prompts  # full, although half of what arrived carried no signal
    assert all(len({s.reward for s in g.samples}) == 2 for _, g in batch)
    # The 6 prompts in flight at first held only 2 trainable groups: the feeder fed more as filtered ones freed
    # their slots, and the batch filled from those.
    assert feeder.fed > 6 and len(filtered) >= 4
    assert metrics.filtered._value.get() == len(filtered) and len(to_ack) == len(filtered)
    assert feeder.filtered == len(filtered) and not set(filtered) & set(feeder.pending)
    # The extra prompts were fed within admission control: never more in flight than its bound.
    assert len(feeder.pending) <= cfg.max_inflight_prompts
    # fed = trainable in hand + filtered + the rest still in flight, by the ledger
    fed = {t.task_id for t in feeder.pending.values()} | set(filtered)
    assert {g.task_id for _, g in batch} <= fed


def test_a_step_that_filters_max_oversample_groups_trains_on_what_it_has(parts) -> None:
    cfg, client, keys, prompts, trajectories, feeder, intake, metrics = parts
    cfg.learner.filter_groups, cfg.learner.max_oversample = "zero_variance", 2
    feeder.top_up(version=0)
    tasks = [t for _, t in prompts.read("gen-0", 10)]
    trajectories.add_many([_mixed(tasks[0], 0, [0.0, 1.0]), _mixed(tasks[1], 0, [1.0, 1.0]),
                           _mixed(tasks[2], 0, [0.0, 0.0])])
    filtered: list[str] = []
    batch, _ = intake.collect(step=1, version=0, drop_log=[], on_wait=lambda: None, on_redis_restart=lambda: None,
                              filter_log=filtered)
    assert [g.task_id for _, g in batch] == [tasks[0].task_id]  # short: 1 of 3, the cap of 2 filtered reached
    assert filtered == [tasks[1].task_id, tasks[2].task_id]

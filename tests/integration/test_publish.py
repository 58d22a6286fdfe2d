"""A generator's publish against a real Redis: results in one round trip, then the acks, never an ack without
its result (services/publish.py)."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from services.control import Keys
from services.protocol import EvalResult, PromptTask, SamplingParams, TrajectoryGroup
from services.publish import publish_and_ack
from services.queue import eval_queue, prompt_queue, trajectory_queue
from services.redis_client import connect


def _queues(client: redis.Redis, ns: str):
    keys = Keys(ns)
    queues = prompt_queue(client, keys), trajectory_queue(client, keys), eval_queue(client, keys)
    for q in queues:
        q.ensure_group()
    return queues


def _group(task_id: str) -> TrajectoryGroup:
    return TrajectoryGroup.build(task_id, [1, 2], [[3, 4, 5], [6]], [[-0.1, -0.2, -0.3], [-0.4]], [1.0, 0.0],
                                 ["stop", "length"], ["", ""], ["correct", "wrong"], 2, "gen-0", 3)


def test_results_then_acks(redis_url: str) -> None:
    client = connect(redis_url)
    prompts, trajectories, evals = _queues(client, "pub-ok")
    prompts.add_many([PromptTask(f"t{i}", "q", "1", "math", 2, SamplingParams(), 0, (1, 2)) for i in range(3)])
    taken = prompts.read("gen-0", 3)
    client.config_resetstat()
    publish_and_ack([(trajectories, [_group("t0"), _group("t1")]),
                     (evals, [EvalResult("t2", 4, (1.0, 0.0), 2, 3, "gen-0")])], prompts, [e for e, _ in taken])
    stats = client.info("commandstats")
    assert stats["cmdstat_xadd"]["calls"] == 3 and stats["cmdstat_xack"]["calls"] == 1
    assert prompts.pending_count() == 0
    got = trajectories.read("learner-0", 10)
    assert [g.task_id for _, g in got] == ["t0", "t1"]
    assert got[0][1].samples[0].response_ids.tolist() == [3, 4, 5] and got[0][1].samples[1].reward == 0.0
    assert not got[0][1].samples[0].response_ids.flags.writeable  # a view over the field Redis sent
    assert [e.task_id for _, e in evals.read("learner-0", 10)] == ["t2"]
    entry = client.xrange(trajectories.stream)[0][1]
    assert sorted(entry) == [b"g", b"i", b"l", b"m", b"p"]  # the frame and its four arrays as fields


def test_a_refused_result_leaves_its_prompt_pending(redis_url: str) -> None:
    client = connect(redis_url)
    prompts, trajectories, evals = _queues(client, "pub-refused")
    prompts.add_many([PromptTask("t0", "q", "1", "math", 2, SamplingParams(), 0, (1, 2))])
    taken = prompts.read("gen-0", 1)
    client.delete(evals.stream)
    client.set(evals.stream, "not a stream")  # an XADD that fails while it runs (WRONGTYPE)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        publish_and_ack([(trajectories, [_group("t0")]), (evals, [EvalResult("t9", 0, (1.0,), 0, 0, "g")])],
                        prompts, [e for e, _ in taken])
    assert prompts.pending_count() == 1  # not acked: a peer reclaims it and the task is still done once
    assert np.array_equal(trajectories.read("learner-0", 1)[0][1].prompt_ids, [1, 2])  # at-least-once

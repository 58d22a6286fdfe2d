"""The learner's check of a decoded group against the task it was fed (learner.intake.invalid_group): each
kind of mismatch is named, and a group that answers the task passes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from learner.intake import invalid_group
from services.protocol import PromptTask, Sample, SamplingParams, TrajectoryGroup

TASK = PromptTask("t1", "1+1=", "2", "math", 2, SamplingParams(max_tokens=8), 3, (5, 6, 7))


def _group(**change) -> TrajectoryGroup:
    s = Sample(np.array([1, 2, 3], np.int32), np.full(3, -0.1, np.float32), 1.0, "stop", "x")
    base = TrajectoryGroup("t1", np.array([5, 6, 7], np.int32), (s, s), 3, "g", 4)
    return dataclasses.replace(base, **change)


def _sample(ids, finish="stop", verdict="wrong") -> Sample:
    return Sample(np.asarray(ids, np.int32), np.full(len(ids), -0.1, np.float32), 0.0, finish, "", verdict)


def test_a_group_that_answers_its_task_passes() -> None:
    assert invalid_group(_group(), TASK, version=5, vocab_size=100) is None


@pytest.mark.parametrize(("change", "reason"), [
    ({"task_id": "t9"}, "was not fed by this run"),
    ({"samples": (_sample([1]),)}, "1 samples, 2 were asked for"),
    ({"prompt_ids": np.array([5, 6, 8], np.int32)}, "prompt_ids differ"),
    ({"policy_version": 6, "policy_version_last": 6}, "policy versions 6..6 outside 0..5"),
    ({"policy_version_last": 2}, "policy versions 3..2"),
    ({"samples": (_sample([1]), _sample(range(9)))}, "sample 1: 9 tokens, max_tokens is 8"),
    ({"samples": (_sample([1]), _sample([1, 100]))}, "sample 1: token id outside the vocabulary [0, 100)"),
    ({"samples": (_sample([-1]), _sample([1]))}, "sample 0: token id outside"),
    ({"samples": (_sample([1], "boom"), _sample([1]))}, "unknown finish_reason 'boom'"),
    ({"samples": (_sample([1]), _sample([1], verdict="error"))}, "sample 1: graded `error`"),
])
def test_each_mismatch_is_named(change: dict, reason: str) -> None:
    group = _group(**change)
    task = None if change.get("task_id") else TASK
    problem = invalid_group(group, task, version=5, vocab_size=100)
    assert problem is not None and reason in problem, problem

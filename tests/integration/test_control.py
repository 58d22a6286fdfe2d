"""The control plane against a real redis-server: each key holds one typed message, a reader skips (and logs)
what does not decode instead of trusting it, and a reset empties the run's streams and keys, not another
run's."""

from __future__ import annotations

import logging
import uuid

from services.control import CheckpointPointer, ControlPlane, Heartbeat, Keys
from services.protocol import PromptTask, SamplingParams, WeightsAnnouncement
from services.queue import prompt_queue


def _plane(redis_client) -> ControlPlane:
    return ControlPlane(redis_client, Keys(f"orz:control-{uuid.uuid4().hex[:8]}"))


def test_heartbeats_are_typed_and_junk_is_skipped(redis_client, caplog) -> None:
    control = _plane(redis_client)
    assert control.heartbeats() == {} and control.generator_count() == 0
    beat = Heartbeat(100.0, 3, 11, "host-a", 90.0, 1.5, "ab")
    control.beat("gen-0", beat)
    redis_client.hset(control.keys.generators, "gen-old", b'{"ts": 1}')  # a JSON heartbeat of an older build
    with caplog.at_level(logging.WARNING, logger="orz.control"):
        assert control.heartbeats() == {"gen-0": beat}
    assert any("unreadable heartbeat of 'gen-old'" in r.message for r in caplog.records)
    assert control.generator_count() == 2
    control.leave("gen-0")
    assert "gen-0" not in control.heartbeats()


def test_policy_version_checkpoint_and_announcement(redis_client) -> None:
    control = _plane(redis_client)
    assert control.policy_version() is None and control.checkpoint() is None and control.announcement() is None
    control.set_policy_version(12)
    assert control.policy_version() == 12
    control.publish_checkpoint(CheckpointPointer("/runs/x/checkpoints/step-000012", 12))
    assert control.checkpoint() == CheckpointPointer("/runs/x/checkpoints/step-000012", 12)
    redis_client.set(control.keys.checkpoint, b'{"path": "/p", "version": 1}')  # not a CheckpointPointer
    assert control.checkpoint() is None
    ann = WeightsAnnouncement("tcp://10.0.0.1:29500", 2, "gloo", ("w",), ((2,),), "float32", 1024, "s1", ("g",))
    control.announce(ann)
    assert control.announcement() == ann
    control.withdraw_announcement()
    assert control.announcement() is None


def test_reset_empties_this_run_only(redis_client) -> None:
    mine, theirs = _plane(redis_client), _plane(redis_client)
    for control in (mine, theirs):
        control.set_policy_version(1)
        control.publish_checkpoint(CheckpointPointer("/c", 1))
        prompt_queue(redis_client, control.keys).add(PromptTask("t", "1+1=", "2", "math", 1, SamplingParams(), 0))
    mine.reset()
    assert mine.policy_version() is None and mine.checkpoint() is None
    assert redis_client.exists(mine.keys.prompts) == 0
    assert theirs.policy_version() == 1 and redis_client.xlen(theirs.keys.prompts) == 1
    assert mine.server_run_id() == theirs.server_run_id() and len(mine.server_run_id()) == 40
    used, _ = mine.memory()
    assert used > 0 and mine.server_cpu_s() > 0

"""The wire protocol (services/protocol.py): exact round trips, and a ProtocolError for anything malformed.

A message that slips through malformed would reach the learner's loss; one that raises anything but
ProtocolError would crash a consumer instead of going to the dead-letter stream.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import pytest

from services import protocol
from services.control import CheckpointPointer, Heartbeat, RankCommand
from services.protocol import (
    SCHEMA_VERSION,
    PromptTask,
    ProtocolError,
    Sample,
    SamplingParams,
    TrajectoryGroup,
    WeightsAnnouncement,
)


def make_task(prompt_ids: tuple[int, ...] | None = (1, 2, 3, 70000)) -> PromptTask:
    return PromptTask(
        task_id="t-17", prompt="What is 2+3?", reference="5", task_type="math", n_samples=8,
        sampling=SamplingParams(temperature=0.7, top_p=0.95, max_tokens=32, stop=("</answer>", "\n\n")),
        feed_version=4, prompt_ids=prompt_ids,
    )  # fmt: skip


def make_sample(n: int, seed: int, reward: float = 1.0) -> Sample:
    rng = np.random.default_rng(seed)
    return Sample(
        response_ids=rng.integers(0, 50_000, size=n).astype(np.int32),
        logprobs=-rng.random(n).astype(np.float32) * 5,
        reward=reward, finish_reason="stop", text=f"sample {seed} <answer>5</answer>", verdict="correct",
    )  # fmt: skip


def make_group() -> TrajectoryGroup:
    return TrajectoryGroup(
        task_id="t-17", prompt_ids=np.array([5, 6, 7], dtype=np.int32),
        samples=(make_sample(5, 0), make_sample(1, 1, 0.0), make_sample(0, 2, 0.0), make_sample(12, 3)),
        policy_version=3, generator_id="gen-a", policy_version_last=4, timings={"generate_s": 1.5, "grade_s": 0.25},
    )  # fmt: skip


def make_announcement() -> WeightsAnnouncement:
    return WeightsAnnouncement(
        rendezvous="tcp://10.0.0.1:29500", world_size=3, backend="gloo",
        names=("embed.weight", "lm_head.bias", "scale"), shapes=((384, 128), (384,), ()),
        dtype="bfloat16", bucket_bytes=256 * 2**20, session="s-1",
    )  # fmt: skip


MAKERS = {"PromptTask": make_task, "TrajectoryGroup": make_group, "WeightsAnnouncement": make_announcement}


def envelope(payload: Any, tag: str = "PromptTask", version: Any = SCHEMA_VERSION) -> bytes:
    return msgpack.packb({"v": version, "t": tag, "d": payload}, use_bin_type=True)


def payload_of(msg: PromptTask | TrajectoryGroup | WeightsAnnouncement) -> dict[str, Any]:
    env = msgpack.unpackb(msg.to_bytes(), raw=False)
    return env["d"]


# --- round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_ids", [(1, 2, 3, 70000), None, ()])
def test_prompt_task_round_trip(prompt_ids: tuple[int, ...] | None) -> None:
    task = make_task(prompt_ids)
    back = PromptTask.from_bytes(task.to_bytes())
    assert back == task
    assert back.prompt_ids == prompt_ids
    assert back.sampling.stop == ("</answer>", "\n\n")


def test_prompt_ids_travel_packed() -> None:
    raw_ids = payload_of(make_task((1, 2, 3, 70000)))["prompt_ids"]
    assert isinstance(raw_ids, bytes)
    assert raw_ids == np.array([1, 2, 3, 70000], dtype="<i4").tobytes()


def test_trajectory_group_round_trip() -> None:
    group = make_group()
    back = TrajectoryGroup.from_bytes(group.to_bytes())
    assert back.task_id == group.task_id
    assert back.policy_version == 3 and back.policy_version_last == 4
    assert back.generator_id == "gen-a"
    assert back.timings == {"generate_s": 1.5, "grade_s": 0.25}
    assert back.prompt_ids.dtype == np.int32
    np.testing.assert_array_equal(back.prompt_ids, group.prompt_ids)
    assert len(back.samples) == 4
    for got, want in zip(back.samples, group.samples, strict=True):
        assert got.response_ids.dtype == np.int32
        assert got.logprobs.dtype == np.float32
        np.testing.assert_array_equal(got.response_ids, want.response_ids)
        np.testing.assert_array_equal(got.logprobs, want.logprobs)  # bit-exact: float32 in, float32 out
        assert (got.reward, got.finish_reason, got.text, got.verdict) == (
            want.reward, want.finish_reason, want.text, want.verdict,
        )  # fmt: skip
    assert back.samples[2].response_ids.shape == (0,)


def test_trajectory_arrays_are_packed_bytes_on_the_wire() -> None:
    group = make_group()
    d = payload_of(group)
    assert isinstance(d["prompt_ids"], bytes)
    cols = d["samples"]
    assert isinstance(cols["response_ids"], bytes), "token ids must not travel as a list of numbers"
    assert isinstance(cols["logprobs"], bytes), "logprobs must not travel as a list of numbers"
    assert cols["lengths"] == np.array([5, 1, 0, 12], "<i4").tobytes()
    assert cols["response_ids"] == np.concatenate([s.response_ids for s in group.samples]).astype("<i4").tobytes()
    assert cols["logprobs"] == np.concatenate([s.logprobs for s in group.samples]).astype("<f4").tobytes()
    # 18 tokens cost 72 + 72 bytes, not 18 msgpack ints and 18 msgpack doubles (up to 5 + 9 bytes each)
    assert len(cols["response_ids"]) == len(cols["logprobs"]) == 72
    assert cols["rewards"] == [1.0, 0.0, 0.0, 1.0]


def test_decoded_samples_are_writable_and_independent() -> None:
    back = TrajectoryGroup.from_bytes(make_group().to_bytes())
    first, last = back.samples[0].response_ids, back.samples[3].response_ids
    first[:] = -1  # a consumer may write into its arrays (torch.as_tensor needs them writable)
    assert (last != -1).all() and last.size == 12


def test_trajectory_defaults_policy_version_last_to_policy_version() -> None:
    group = TrajectoryGroup(
        "t", np.array([1], np.int32), (make_sample(2, 0),), policy_version=7, generator_id="g"
    )
    assert TrajectoryGroup.from_bytes(group.to_bytes()).policy_version_last == 7


def test_weights_announcement_round_trip() -> None:
    ann = make_announcement()
    back = WeightsAnnouncement.from_bytes(ann.to_bytes())
    assert back == ann
    assert back.shapes == ((384, 128), (384,), ())


def make_heartbeat(layout: str | None = "ab12") -> Heartbeat:
    return Heartbeat(ts=1.5e9, version=7, pid=4242, host="gen-host", started=1.4e9, busy_s=12.25, layout=layout)


@pytest.mark.parametrize("layout", ["ab12", None])
def test_control_messages_round_trip(layout: str | None) -> None:
    beat = make_heartbeat(layout)
    assert Heartbeat.from_bytes(beat.to_bytes()) == beat
    pointer = CheckpointPointer("/runs/r/checkpoints/step-000040", 40)
    assert CheckpointPointer.from_bytes(pointer.to_bytes()) == pointer


def test_rank_command_carries_whole_groups() -> None:
    cmd = RankCommand(RankCommand.BATCH, (make_group(), make_group()))
    back = RankCommand.from_bytes(cmd.to_bytes())
    assert back.cmd == RankCommand.BATCH and len(back.groups) == 2
    assert back.groups[0].task_id == make_group().task_id
    np.testing.assert_array_equal(back.groups[1].samples[0].logprobs, make_group().samples[0].logprobs)
    assert RankCommand.from_bytes(RankCommand(RankCommand.STOP).to_bytes()).groups == ()
    with pytest.raises(ProtocolError, match="unknown command"):
        RankCommand.from_bytes(protocol.encode("RankCommand", {"cmd": 9, "groups": []}))
    with pytest.raises(ProtocolError, match="encoded groups"):
        RankCommand.from_bytes(protocol.encode("RankCommand", {"cmd": 0, "groups": [1]}))
    with pytest.raises(ProtocolError):  # a group inside that does not decode
        RankCommand.from_bytes(protocol.encode("RankCommand", {"cmd": 0, "groups": [b"junk"]}))


@pytest.mark.parametrize(("field", "value"), [("ts", "x"), ("version", 1.5), ("pid", None), ("layout", 3),
                                              ("busy_s", True), ("host", 7)])
def test_malformed_heartbeat_is_rejected(field: str, value: Any) -> None:
    payload = {"ts": 1.0, "version": 1, "pid": 1, "host": "h", "started": 1.0, "busy_s": 0.0, "layout": None}
    Heartbeat.from_bytes(protocol.encode("Heartbeat", payload))  # well-formed
    with pytest.raises(ProtocolError):
        Heartbeat.from_bytes(protocol.encode("Heartbeat", {**payload, field: value}))


# --- rejection ---------------------------------------------------------------------------------------------


def test_random_garbage_is_rejected() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        junk = rng.bytes(int(rng.integers(0, 200)))
        with pytest.raises(ProtocolError):
            PromptTask.from_bytes(junk)
        with pytest.raises(ProtocolError):
            TrajectoryGroup.from_bytes(junk)


@pytest.mark.parametrize("raw", [b"", b"\xc1", b"\xff" * 10, "not bytes", None, 42])
def test_non_messages_are_rejected(raw: Any) -> None:
    with pytest.raises(ProtocolError):
        PromptTask.from_bytes(raw)


@pytest.mark.parametrize("msg", [make_task(), make_group(), make_announcement(), make_heartbeat(),
                                 CheckpointPointer("/ckpt", 3)], ids=lambda m: m.TAG)
def test_every_truncation_is_rejected(msg: PromptTask | TrajectoryGroup | WeightsAnnouncement) -> None:
    raw = msg.to_bytes()
    type(msg).from_bytes(raw)  # the whole message is fine
    for cut in range(len(raw)):
        with pytest.raises(ProtocolError):
            type(msg).from_bytes(raw[:cut])


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(ProtocolError):
        PromptTask.from_bytes(make_task().to_bytes() + b"\x00")


@pytest.mark.parametrize("version", [1, 3, 0, None, "2", 2.0, True])
def test_other_schema_versions_are_rejected(version: Any) -> None:
    raw = envelope(payload_of(make_task()), version=version)
    with pytest.raises(ProtocolError, match="schema version"):
        PromptTask.from_bytes(raw)
    # the same payload under the current version is accepted, so the version alone caused the rejection
    assert PromptTask.from_bytes(envelope(payload_of(make_task()))) == make_task()


def test_wrong_type_tag_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="message type"):
        TrajectoryGroup.from_bytes(make_task().to_bytes())
    with pytest.raises(ProtocolError, match="message type"):
        PromptTask.from_bytes(make_group().to_bytes())
    with pytest.raises(ProtocolError, match="message type"):
        PromptTask.from_bytes(envelope(payload_of(make_task()), tag="promptTask"))


@pytest.mark.parametrize(
    "env", [[2, "PromptTask", {}], {"v": 2, "t": "PromptTask"}, {"v": 2, "t": "PromptTask", "d": [1, 2]}]
)
def test_malformed_envelopes_are_rejected(env: Any) -> None:
    with pytest.raises(ProtocolError):
        PromptTask.from_bytes(msgpack.packb(env))


@pytest.mark.parametrize(
    "field", ["task_id", "prompt", "reference", "task_type", "n_samples", "sampling", "feed_version"]
)
def test_prompt_task_missing_field_is_rejected(field: str) -> None:
    d = payload_of(make_task())
    del d[field]
    with pytest.raises(ProtocolError, match=field):
        PromptTask.from_bytes(envelope(d))


@pytest.mark.parametrize("field", ["task_id", "prompt_ids", "samples", "policy_version", "generator_id"])
def test_trajectory_missing_field_is_rejected(field: str) -> None:
    d = payload_of(make_group())
    del d[field]
    with pytest.raises(ProtocolError, match=field):
        TrajectoryGroup.from_bytes(envelope(d, tag="TrajectoryGroup"))


@pytest.mark.parametrize("field", ["lengths", "response_ids", "logprobs", "rewards", "finish_reasons", "texts"])
def test_sample_missing_field_is_rejected(field: str) -> None:
    d = payload_of(make_group())
    del d["samples"][field]
    with pytest.raises(ProtocolError, match=field):
        TrajectoryGroup.from_bytes(envelope(d, tag="TrajectoryGroup"))


@pytest.mark.parametrize(
    ("tag", "path", "value"),
    [
        ("PromptTask", ("n_samples",), "8"),
        ("PromptTask", ("feed_version",), "4"),
        ("PromptTask", ("feed_version",), 4.0),
        ("PromptTask", ("task_id",), 17),
        ("PromptTask", ("prompt_ids",), [1, 2, 3]),  # a list, not packed bytes
        ("PromptTask", ("prompt_ids",), b"\x01\x00\x00"),  # not a whole number of int32
        ("PromptTask", ("sampling",), "greedy"),
        ("PromptTask", ("sampling", "max_tokens"), "32"),
        ("PromptTask", ("sampling", "stop"), "</answer>"),
        ("TrajectoryGroup", ("policy_version",), "3"),
        ("TrajectoryGroup", ("policy_version_last",), "4"),
        ("TrajectoryGroup", ("samples",), {"0": 1}),
        ("TrajectoryGroup", ("samples",), [{"response_ids": b"", "logprobs": b""}]),  # schema 1's list of maps
        ("TrajectoryGroup", ("samples", "rewards", 0), "1.0"),
        ("TrajectoryGroup", ("samples", "rewards"), [1.0, 0.0, 0.0]),  # one short
        ("TrajectoryGroup", ("samples", "response_ids"), [1, 2, 3, 4, 5]),
        ("TrajectoryGroup", ("samples", "lengths"), np.array([5, 1, 0, 11], "<i4").tobytes()),  # 17 ≠ 18 tokens
        ("TrajectoryGroup", ("samples", "lengths"), np.array([6, 1, -1, 12], "<i4").tobytes()),  # negative
        ("TrajectoryGroup", ("samples", "texts", 0), b"bytes, not str"),
        ("TrajectoryGroup", ("samples", "finish_reasons"), "stop"),
        ("TrajectoryGroup", ("samples", "verdicts", 1), 3),
        ("TrajectoryGroup", ("timings",), {"generate_s": "1.5"}),
        ("WeightsAnnouncement", ("world_size",), "3"),
        ("WeightsAnnouncement", ("shapes",), [[384, "128"], [384], []]),
        ("WeightsAnnouncement", ("names",), ["a", "b"]),  # names and shapes disagree
    ],
)
def test_wrong_field_types_are_rejected(tag: str, path: tuple[Any, ...], value: Any) -> None:
    msg = MAKERS[tag]()
    d = payload_of(msg)
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ProtocolError):
        type(msg).from_bytes(envelope(d, tag=tag))


@pytest.mark.parametrize(
    ("tag", "path"),
    [
        ("PromptTask", ("n_samples",)),
        ("PromptTask", ("feed_version",)),
        ("PromptTask", ("sampling", "max_tokens")),
        ("TrajectoryGroup", ("policy_version",)),
        ("TrajectoryGroup", ("policy_version_last",)),
        ("TrajectoryGroup", ("samples", "rewards", 0)),
        ("TrajectoryGroup", ("timings", "grade_s")),
        ("WeightsAnnouncement", ("world_size",)),
        ("WeightsAnnouncement", ("bucket_bytes",)),
        ("WeightsAnnouncement", ("shapes", 1, 0)),
    ],
)
def test_bool_where_a_number_is_expected_is_rejected(tag: str, path: tuple[Any, ...]) -> None:
    # msgpack keeps True distinct from 1, but Python's isinstance(True, int) is True: the check must not.
    msg = MAKERS[tag]()
    d = payload_of(msg)
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = True
    with pytest.raises(ProtocolError):
        type(msg).from_bytes(envelope(d, tag=tag))


def test_mismatched_ids_and_logprobs_are_rejected() -> None:
    bad = Sample(np.arange(5, dtype=np.int32), np.full(4, -0.5, np.float32), 1.0, "stop", "x")
    group = TrajectoryGroup("t", np.array([1], np.int32), (make_sample(3, 0), bad), 0, "g")
    with pytest.raises(ProtocolError, match="8 tokens, but 8 response ids and 7 logprobs"):
        TrajectoryGroup.from_bytes(group.to_bytes())


@pytest.mark.parametrize("reward", [math.nan, math.inf, -math.inf])
def test_non_finite_reward_is_rejected(reward: float) -> None:
    group = TrajectoryGroup("t", np.array([1], np.int32), (make_sample(3, 0, reward=reward),), 0, "g")
    with pytest.raises(ProtocolError, match="reward"):
        TrajectoryGroup.from_bytes(group.to_bytes())


@pytest.mark.parametrize("bad_value", [0.5, math.nan, -math.inf])
def test_invalid_logprobs_are_rejected(bad_value: float) -> None:
    logprobs = np.array([-0.1, bad_value, -2.0], np.float32)
    sample = Sample(np.array([1, 2, 3], np.int32), logprobs, 1.0, "stop", "x")
    group = TrajectoryGroup("t", np.array([1], np.int32), (sample,), 0, "g")
    with pytest.raises(ProtocolError, match="logprobs"):
        TrajectoryGroup.from_bytes(group.to_bytes())


def test_logprob_of_zero_is_accepted() -> None:
    # a greedy token has log-prob 0 (up to float error); only clearly positive values are malformed
    sample = Sample(np.array([1, 2], np.int32), np.array([0.0, -1e-7], np.float32), 1.0, "stop", "x")
    group = TrajectoryGroup("t", np.array([1], np.int32), (sample,), 0, "g")
    np.testing.assert_array_equal(
        TrajectoryGroup.from_bytes(group.to_bytes()).samples[0].logprobs, sample.logprobs
    )


def test_group_without_samples_is_rejected() -> None:
    group = TrajectoryGroup("t", np.array([1], np.int32), (), 0, "g")
    with pytest.raises(ProtocolError, match="no samples"):
        TrajectoryGroup.from_bytes(group.to_bytes())


@pytest.mark.parametrize("n_samples", [0, -1, 4097])
def test_out_of_range_n_samples_is_rejected(n_samples: int) -> None:
    d = payload_of(make_task())
    d["n_samples"] = n_samples
    with pytest.raises(ProtocolError, match="n_samples"):
        PromptTask.from_bytes(envelope(d))


def test_oversize_message_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        PromptTask.from_bytes(b"\x80" * (protocol.MAX_MESSAGE_BYTES + 1))
    task = PromptTask("t", "x" * 1000, "5", "math", 1, SamplingParams(), 0)
    raw = task.to_bytes()
    monkeypatch.setattr(protocol, "MAX_MESSAGE_BYTES", len(raw))
    assert PromptTask.from_bytes(raw) == task  # exactly at the limit is fine
    monkeypatch.setattr(protocol, "MAX_MESSAGE_BYTES", len(raw) - 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        PromptTask.from_bytes(raw)

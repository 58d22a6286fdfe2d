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

from services import envelope as wire
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


def envelope(payload: Any, tag: str = "PromptTask", version: Any = SCHEMA_VERSION,
             arrays: list[bytes] | None = None) -> bytes:
    """A message of `tag` around `payload`; a TrajectoryGroup is framed, with `arrays` (default: make_group's)."""
    if tag == "TrajectoryGroup":
        d = dict(payload)
        d.pop("arrays", None)
        return protocol.frame(tag, d, arrays if arrays is not None else group_arrays(make_group()))
    return msgpack.packb({"v": version, "t": tag, "d": payload}, use_bin_type=True)


def payload_of(msg: PromptTask | TrajectoryGroup | WeightsAnnouncement) -> dict[str, Any]:
    if isinstance(msg, TrajectoryGroup):
        return protocol.frame_arrays(msg.to_bytes(), msg.TAG)[0]
    env = msgpack.unpackb(msg.to_bytes(), raw=False)
    return env["d"]


def group_arrays(group: TrajectoryGroup) -> list[bytes]:
    """The frame's arrays: prompt ids, lengths, then each sample's ids, then each sample's log-probs."""
    return protocol.frame_arrays(group.to_bytes(), group.TAG)[1]


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
    d, arrays = protocol.frame_arrays(group.to_bytes(), group.TAG)
    assert arrays[0] == np.array([5, 6, 7], "<i4").tobytes()
    assert arrays[1] == np.array([5, 1, 0, 12], "<i4").tobytes()
    assert arrays[2] == np.concatenate([s.response_ids for s in group.samples]).astype("<i4").tobytes()
    assert arrays[3] == np.concatenate([s.logprobs for s in group.samples]).astype("<f4").tobytes()
    # 18 tokens cost 72 + 72 bytes, not 18 msgpack ints and 18 msgpack doubles (up to 5 + 9 bytes each)
    assert len(arrays[2]) == len(arrays[3]) == 72 and d["arrays"] == [len(a) for a in arrays]
    assert d["samples"]["rewards"] == [1.0, 0.0, 0.0, 1.0]


def received(fields: dict) -> dict[bytes, bytes]:
    return {k.encode(): bytes(v) for k, v in fields.items()}


def test_stream_fields_carry_the_arrays_as_they_lie() -> None:
    group = make_group()
    fields = group.to_fields()
    assert list(fields) == ["m", "p", "l", "i", "g"]
    d, arrays = protocol.frame_arrays(group.to_bytes(), group.TAG)
    assert [bytes(fields[k]) for k in "plig"] == arrays  # the same bytes as the one-message form
    assert len(fields["m"]) < 1000  # the frame alone: header, no arrays
    back = TrajectoryGroup.from_fields(received(fields))
    for got, want in zip(back.samples, group.samples, strict=True):
        np.testing.assert_array_equal(got.response_ids, want.response_ids)
        np.testing.assert_array_equal(got.logprobs, want.logprobs)
        assert (got.reward, got.finish_reason, got.text, got.verdict) == (want.reward, want.finish_reason,
                                                                          want.text, want.verdict)
    # a whole one-message frame under `m` alone also decodes (tools, tests, dead letters put back)
    assert TrajectoryGroup.from_fields({b"m": group.to_bytes()}).task_id == group.task_id


def test_built_groups_are_views_of_one_column_each() -> None:
    group = TrajectoryGroup.build("t", [1, 2], [[3, 4], [5], []], [[-0.5, -1.0], [-2.0], []], [1, 0, 1],
                                  ["stop", "length", "stop"], ["", "", ""], ["correct", "wrong", "correct"], 2, "g")
    assert group.ids_all.tolist() == [3, 4, 5] and group.lps_all.tolist() == [-0.5, -1.0, -2.0]
    assert [s.response_ids.tolist() for s in group.samples] == [[3, 4], [5], []]
    assert all(np.shares_memory(s.response_ids, group.ids_all) for s in group.samples[:2])
    assert group.samples[1].reward == 0.0 and isinstance(group.samples[0].reward, float)
    back = TrajectoryGroup.from_fields(received(group.to_fields()))
    assert [s.logprobs.tolist() for s in back.samples] == [[-0.5, -1.0], [-2.0], []]


@pytest.mark.parametrize(("change", "reason"), [
    (lambda f: f.pop(b"g"), "stream fields"),
    (lambda f: f.update({b"x": b""}), "stream fields"),
    (lambda f: f.update({b"i": f[b"i"][:-4]}), "array fields of"),
    (lambda f: f.update({b"m": make_group().to_bytes()}), "do not match"),  # a frame with a blob, and fields
])
def test_malformed_stream_fields_are_rejected(change, reason: str) -> None:
    fields = received(make_group().to_fields())
    change(fields)
    with pytest.raises(ProtocolError, match=reason):
        TrajectoryGroup.from_fields(fields)


def test_a_frame_is_one_msgpack_map_so_a_schema_2_reader_names_the_version(monkeypatch) -> None:
    raw = make_group().to_bytes()
    env = msgpack.unpackb(raw, raw=False)
    assert list(env) == ["v", "h", "t", "d", "_", "b"] and env["v"] == 3 and env["t"] == "TrajectoryGroup"
    # A schema-2 build decodes every message with this module's `decode` (unchanged since) at version 2:
    # it reads the frame as the map it is and refuses it by its version, not as garbage.
    with monkeypatch.context() as m:
        m.setattr(wire, "SCHEMA_VERSION", 2)
        with pytest.raises(ProtocolError, match=r"unknown schema version 3 \(this build speaks 2\)"):
            protocol.decode(raw, "TrajectoryGroup")
    # and a schema-2 message reaching this build is refused by its version
    old = msgpack.packb({"v": 2, "t": "TrajectoryGroup", "d": {"task_id": "t"}}, use_bin_type=True)
    with pytest.raises(ProtocolError, match="unknown schema version 2"):
        TrajectoryGroup.from_bytes(old)


def test_decoded_arrays_are_read_only_views_over_the_message() -> None:
    raw = make_group().to_bytes()
    back = TrajectoryGroup.from_bytes(raw)
    whole = np.frombuffer(raw, np.uint8)
    for s in back.samples:
        assert np.shares_memory(s.response_ids, whole) or s.response_ids.size == 0
        assert np.shares_memory(s.logprobs, whole) or s.logprobs.size == 0
        assert not s.response_ids.flags.writeable and not s.logprobs.flags.writeable
        assert s.response_ids.ctypes.data % 4 == 0 and s.logprobs.ctypes.data % 4 == 0  # the frame aligns its blob
    with pytest.raises(ValueError, match="read-only"):
        back.samples[0].response_ids[:] = -1
    kept = back.samples[0].response_ids.copy()  # what a consumer keeps it copies, and may write
    kept[:] = -1
    assert (back.samples[3].response_ids != -1).all()
    np.testing.assert_array_equal(back.response_ids_all(), np.concatenate([s.response_ids for s in back.samples]))


def test_texts_travel_only_when_the_group_has_them() -> None:
    group = make_group()
    bare = TrajectoryGroup(group.task_id, group.prompt_ids,
                           tuple(Sample(s.response_ids, s.logprobs, s.reward, s.finish_reason, "", s.verdict)
                                 for s in group.samples), 3, "gen-a")
    assert "texts" in payload_of(group)["samples"] and "texts" not in payload_of(bare)["samples"]
    assert len(bare.to_bytes()) < len(group.to_bytes())
    assert all(s.text == "" for s in TrajectoryGroup.from_bytes(bare.to_bytes()).samples)


@pytest.mark.parametrize("with_texts", [True, False])
def test_prompt_task_asks_for_texts(with_texts: bool) -> None:
    task = PromptTask("t", "q", "1", "math", 2, SamplingParams(), 0, (1,), with_texts=with_texts)
    assert PromptTask.from_bytes(task.to_bytes()).with_texts is with_texts


@pytest.mark.parametrize(
    ("index", "value", "reason"),
    [
        (1, np.array([5, 1, 0, 11], "<i4").tobytes(), "lengths add up to 17 tokens"),  # 17 ≠ 18
        (1, np.array([6, 1, -1, 12], "<i4").tobytes(), "negative length"),
        (1, b"\x01\x00\x00", "lengths"),  # not a whole number of int32
        (0, b"\x01\x00\x00", "prompt_ids"),
        (2, b"\x00" * 68, "lengths add up to 18 tokens, but 17 response ids"),  # one token short
        (3, np.full(18, np.nan, "<f4").tobytes(), "logprobs must be finite"),
        (3, np.full(18, 0.5, "<f4").tobytes(), "logprobs must be finite and <= 0"),
        (2, b"\x00" * 70, "response_ids: expected packed"),  # not a whole number of int32
    ],
)
def test_tampered_frame_arrays_are_rejected(index: int, value: bytes, reason: str) -> None:
    d, arrays = protocol.frame_arrays(make_group().to_bytes(), "TrajectoryGroup")
    arrays[index] = value
    with pytest.raises(ProtocolError, match=reason):
        TrajectoryGroup.from_bytes(envelope(d, tag="TrajectoryGroup", arrays=arrays))


def test_malformed_frames_are_rejected() -> None:
    raw = make_group().to_bytes()
    h = int.from_bytes(raw[7:11], "big")
    cases = {
        "header length": raw[:7] + (len(raw) + 5).to_bytes(4, "big") + raw[11:],
        "padding": raw[:h] + b"\xa1X" + raw[h + 2:],
        "blob of": raw[:-1],
        "array sizes": longer_blob(raw, b"\x00" * 4),
        "not framed": msgpack.packb({"v": SCHEMA_VERSION, "t": "TrajectoryGroup", "d": {}}, use_bin_type=True),
    }
    for reason, bad in cases.items():
        with pytest.raises(ProtocolError, match=reason):
            TrajectoryGroup.from_bytes(bad)


def longer_blob(raw: bytes, extra: bytes) -> bytes:
    """The frame with `extra` bytes appended to its blob, the blob's length field updated to match."""
    h = int.from_bytes(raw[7:11], "big")
    at = h + 4 + raw[h + 3] + 3  # the bin32 length of "b"
    n = int.from_bytes(raw[at:at + 4], "big")
    return raw[:at] + (n + len(extra)).to_bytes(4, "big") + raw[at + 4:] + extra


def test_decoded_arrays_keep_their_message_alive() -> None:
    back = TrajectoryGroup.from_bytes(make_group().to_bytes())  # the bytes object is referenced only by views
    import gc

    gc.collect()
    np.testing.assert_array_equal(back.samples[3].response_ids, make_group().samples[3].response_ids)


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


@pytest.mark.parametrize("version", [1, 2, 4, 0, None, "3", 3.0, True])
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


@pytest.mark.parametrize("field", ["task_id", "samples", "policy_version", "generator_id"])
def test_trajectory_missing_field_is_rejected(field: str) -> None:
    d = payload_of(make_group())
    del d[field]
    with pytest.raises(ProtocolError, match=field):
        TrajectoryGroup.from_bytes(envelope(d, tag="TrajectoryGroup"))


@pytest.mark.parametrize("field", ["rewards", "finish_reasons"])
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
        ("TrajectoryGroup", ("samples", "rewards", 0), "1.0"),
        ("TrajectoryGroup", ("samples", "rewards"), [1.0, 0.0, 0.0]),  # one short
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
    monkeypatch.setattr(wire, "MAX_MESSAGE_BYTES", len(raw))
    assert PromptTask.from_bytes(raw) == task  # exactly at the limit is fine
    monkeypatch.setattr(wire, "MAX_MESSAGE_BYTES", len(raw) - 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        PromptTask.from_bytes(raw)

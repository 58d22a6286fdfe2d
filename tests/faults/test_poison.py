"""Poison in both streams while the stack runs: garbage bytes, a wrong schema version, a missing field, wrong
array lengths, NaN log-probs, absurd lengths, and messages that decode but cannot be used (a prompt with no
token ids, one too long for the engine, a token id past the vocabulary; a group for a task never fed, one
with the wrong number of samples, one whose response is longer than max_tokens). Each lands in the
dead-letter stream with its reason; no consumer stops; the run's accounting stays exact; and a task whose
group was rejected is fed again and trained once."""

from __future__ import annotations

import math
import signal

import msgpack
import numpy as np
import pytest

from services.protocol import SCHEMA_VERSION, PromptTask, Sample, SamplingParams, TrajectoryGroup, frame, frame_arrays
from services.queue import FIELD, GENERATOR_GROUP
from tests.support.harness import Stack, check_accounting, write_report


def _group(task_id: str, prompt_ids, n: int, tokens: int = 3) -> TrajectoryGroup:
    samples = tuple(Sample(np.arange(tokens, dtype=np.int32), np.full(tokens, -0.5, np.float32), 1.0, "stop", "x")
                    for _ in range(n))
    return TrajectoryGroup(task_id, np.asarray(prompt_ids, dtype=np.int32), samples, 0, "poisoner")


def _id(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.decode().partition("-")
    return int(ms), int(seq)


def _tamper(msg: TrajectoryGroup, **arrays: bytes) -> bytes:
    """The group's one-message frame with some of its arrays (`lengths`, `response_ids`, `logprobs`) replaced."""
    payload, parts = frame_arrays(msg.to_bytes(), msg.TAG)
    for name, value in arrays.items():
        parts[{"lengths": 1, "response_ids": 2, "logprobs": 3}[name]] = value
    payload.pop("arrays")
    return frame(msg.TAG, payload, parts)


@pytest.mark.slow
def test_poison_in_both_streams_is_dead_lettered(tmp_path) -> None:
    with Stack(tmp_path, "poison", steps=40, batch=4) as stack:
        stack.wait_steps(3)
        r = stack.client()
        keys = stack.keys
        sp = SamplingParams(max_tokens=stack.cfg.sampling.max_tokens)
        # An in-flight task of the run, for the well-formed but wrong groups. The generators are frozen while
        # those are read, so the task's real group cannot be trained first (the bad ones would then be mere
        # duplicates): a prompt not yet acknowledged has no published group.
        for gen in stack.generators:
            gen.signal(signal.SIGSTOP)
        unacked = {p["message_id"] for p in r.xpending_range(keys.prompts, GENERATOR_GROUP, "-", "+", 1000)}
        last = r.xinfo_groups(keys.prompts)[0]["last-delivered-id"]
        entries = r.xrange(keys.prompts)
        candidates = [f for i, f in entries if i in unacked or _id(i) > _id(last)]
        inflight = PromptTask.from_bytes(candidates[-1][b"m"])

        def prompt(raw: bytes) -> tuple[str, str]:  # (stream, entry id): the two streams' ids can coincide
            return keys.prompts, r.xadd(keys.prompts, {FIELD: raw}).decode()

        def group(raw: bytes) -> tuple[str, str]:
            return keys.trajectories, r.xadd(keys.trajectories, {FIELD: raw}).decode()

        good = _group(inflight.task_id, inflight.prompt_ids, 4)
        wrong_version = msgpack.unpackb(good.to_bytes(), raw=False)
        wrong_version["v"] = SCHEMA_VERSION + 97
        expect = {
            prompt(b"\x00\xff garbage \xc1"): "undecodable msgpack",
            prompt(msgpack.packb({"v": 99, "t": "PromptTask", "d": {}})): "unknown schema version",
            (keys.prompts, r.xadd(keys.prompts, {"other": b"x"}).decode()): "missing field",
            prompt(PromptTask("p-huge-n", "q", "1", "math", 10**6, sp, 0, (1, 2)).to_bytes()): "n_samples out of range",
            prompt(PromptTask("p-no-ids", "q", "1", "math", 2, sp, 0, None).to_bytes()): "no prompt_ids",
            prompt(PromptTask("p-long", "q", "1", "math", 2, sp, 0, tuple([5] * 5000)).to_bytes()):
                "does not fit generator.max_model_len",
            prompt(PromptTask("p-vocab", "q", "1", "math", 2, sp, 0, (5, 10**7)).to_bytes()): "engine refused",
            group(msgpack.packb([1, 2])): "envelope is not a map",
            group(msgpack.packb(wrong_version, use_bin_type=True)): "unknown schema version",
            group(_tamper(good, response_ids=b"\x00" * 8)): "lengths add up to 12 tokens",
            group(_tamper(good, logprobs=np.full(12, math.nan, np.float32).tobytes())): "logprobs must be finite",
            group(_tamper(good, lengths=np.array([2**31 - 1, 1, 1, 1], np.int32).tobytes())): "lengths add up",
            group(_tamper(good, lengths=np.array([-3, 9, 3, 3], np.int32).tobytes())): "negative length",
            group(_group("never-fed", (1, 2), 4).to_bytes()): "was not fed by this run",
            group(_group(inflight.task_id, inflight.prompt_ids, 1).to_bytes()): "1 samples, 4 were asked for",
            group(_group(inflight.task_id, inflight.prompt_ids, 4, tokens=10_000).to_bytes()):
                "10000 tokens, max_tokens is",
        }
        n_groups = sum(stream == keys.trajectories for stream, _ in expect)
        stack.wait("the learner to reject the groups", lambda: sum(
            d.stream == keys.trajectories for d in stack.dead_letters()) >= n_groups, 60)
        for gen in stack.generators:
            gen.signal(signal.SIGCONT)
        stack.finish()
        counts = check_accounting(stack)
        dead = {(d.stream, d.entry_id): d for d in stack.dead_letters()}
        logs = {p.name: p.text() for p in stack.procs}
        ledger = (stack.run / "tasks.jsonl").read_text()

    assert len(expect) == 16
    for key, reason in expect.items():
        assert key in dead, f"{key} ({reason}) was not dead-lettered"
        assert reason in dead[key].reason, (reason, dead[key].reason)
    assert dead[next(iter(expect))].raw == b"\x00\xff garbage \xc1"  # kept as it was received
    assert len(dead) == len(expect)  # and nothing else was
    # the rejected groups' task was fed again, and trained exactly once (check_accounting)
    assert f'"event": "refed", "task_id": "{inflight.task_id}"' in ledger
    assert all("Traceback" not in text for text in logs.values()), [n for n, t in logs.items() if "Traceback" in t]
    write_report("poison", {"entries": len(expect), "dead_lettered": len(dead), **counts})

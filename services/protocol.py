"""The messages that cross process boundaries, and their msgpack encoding (docs/architecture.md, "Messages").

Every message is a frozen dataclass with `to_bytes()` / `from_bytes()`. The envelope is a msgpack map
`{"v": SCHEMA_VERSION, "t": <type tag>, "d": <payload>}`; token ids and log-probs travel as packed
little-endian `int32` / `float32` byte strings, never as lists of Python numbers. Anything that does not
decode to exactly the declared shape raises `ProtocolError`, which the queue turns into a dead-letter
entry carrying the reason. Nothing here unpickles or evaluates received data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import msgpack
import numpy as np

SCHEMA_VERSION = 2  # 2: a TrajectoryGroup's samples travel as columns (`_pack_samples`)
MAX_MESSAGE_BYTES = 64 * 2**20


class ProtocolError(ValueError):
    """A received message is malformed, of the wrong type, or of an unknown schema version."""


def pack_i32(values: Any) -> memoryview:
    # A view, not `tobytes()`: msgpack copies a buffer straight into the message, so this saves a copy.
    return memoryview(np.ascontiguousarray(values, dtype="<i4")).cast("B")


def pack_f32(values: Any) -> memoryview:
    return memoryview(np.ascontiguousarray(values, dtype="<f4")).cast("B")


def _unpack(raw: Any, dtype: str, what: str) -> np.ndarray:
    if not isinstance(raw, bytes) or len(raw) % 4:
        raise ProtocolError(f"{what}: expected packed {dtype} bytes")
    return np.frombuffer(raw, dtype=dtype).copy()


def get_field(d: dict[str, Any], key: str, types: type | tuple[type, ...], what: str) -> Any:
    if key not in d:
        raise ProtocolError(f"{what}: missing field {key!r}")
    value = d[key]
    # bool is an int subclass; a bool where a number is expected is a malformed message.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ProtocolError(f"{what}.{key}: expected {types}, got bool")
    if not isinstance(value, types):
        raise ProtocolError(f"{what}.{key}: expected {types}, got {type(value).__name__}")
    return value


def encode(tag: str, payload: dict[str, Any]) -> bytes:
    """The envelope of every message: `{"v": SCHEMA_VERSION, "t": tag, "d": payload}`, msgpack."""
    return msgpack.packb({"v": SCHEMA_VERSION, "t": tag, "d": payload}, use_bin_type=True)


def decode(raw: bytes, tag: str, max_bytes: int | None = None) -> dict[str, Any]:
    max_bytes = MAX_MESSAGE_BYTES if max_bytes is None else max_bytes
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected bytes, got {type(raw).__name__}")
    if len(raw) > max_bytes:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds {max_bytes}")
    try:
        env = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True, max_bin_len=max_bytes)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated exception types on garbage
        raise ProtocolError(f"undecodable msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(env, dict):
        raise ProtocolError("envelope is not a map")
    version = env.get("v")
    # `True == 1` and `1.0 == 1` in Python, so compare the type too: only the int 1 is schema version 1.
    if type(version) is not int or version != SCHEMA_VERSION:
        raise ProtocolError(f"unknown schema version {version!r} (this build speaks {SCHEMA_VERSION})")
    if env.get("t") != tag:
        raise ProtocolError(f"expected message type {tag!r}, got {env.get('t')!r}")
    payload = env.get("d")
    if not isinstance(payload, dict):
        raise ProtocolError("payload is not a map")
    return payload


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    stop: tuple[str, ...] = ("</answer>",)

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "stop": list(self.stop)}

    @classmethod
    def from_dict(cls, d: Any) -> SamplingParams:
        if not isinstance(d, dict):
            raise ProtocolError("sampling: expected a map")
        temperature = float(get_field(d, "temperature", (int, float), "sampling"))
        top_p = float(get_field(d, "top_p", (int, float), "sampling"))
        max_tokens = get_field(d, "max_tokens", int, "sampling")
        stop = get_field(d, "stop", list, "sampling")
        if not all(isinstance(s, str) for s in stop):
            raise ProtocolError("sampling.stop: expected a list of strings")
        if not (0.0 <= temperature <= 10.0) or not (0.0 < top_p <= 1.0) or max_tokens < 1:
            raise ProtocolError(f"sampling: out of range {d!r}")
        return cls(temperature, top_p, max_tokens, tuple(stop))


@dataclass(frozen=True)
class PromptTask:
    """One prompt to sample `n_samples` completions for; the learner's feeder writes it."""

    TAG: ClassVar[str] = "PromptTask"
    task_id: str
    prompt: str
    reference: str
    task_type: str
    n_samples: int
    sampling: SamplingParams
    feed_version: int
    prompt_ids: tuple[int, ...] | None = None
    eval_round: int = -1  # ≥ 0: an eval prompt of the evaluation at that step, answered with an EvalResult

    def to_bytes(self) -> bytes:
        return encode(self.TAG, {
            "task_id": self.task_id, "prompt": self.prompt, "reference": self.reference,
            "task_type": self.task_type, "n_samples": self.n_samples, "sampling": self.sampling.to_dict(),
            "feed_version": self.feed_version,
            "prompt_ids": None if self.prompt_ids is None else pack_i32(self.prompt_ids),
            "eval_round": self.eval_round,
        })

    @classmethod
    def from_bytes(cls, raw: bytes) -> PromptTask:
        d = decode(raw, cls.TAG)
        w = cls.TAG
        ids = d.get("prompt_ids")
        n_samples = get_field(d, "n_samples", int, w)
        if not 1 <= n_samples <= 4096:
            raise ProtocolError(f"{w}.n_samples out of range: {n_samples}")
        return cls(
            task_id=get_field(d, "task_id", str, w), prompt=get_field(d, "prompt", str, w),
            reference=get_field(d, "reference", str, w), task_type=get_field(d, "task_type", str, w),
            n_samples=n_samples, sampling=SamplingParams.from_dict(d.get("sampling")),
            feed_version=get_field(d, "feed_version", int, w),
            prompt_ids=None if ids is None else tuple(int(x) for x in _unpack(ids, "<i4", f"{w}.prompt_ids")),
            eval_round=get_field(d, "eval_round", int, w) if "eval_round" in d else -1,
        )


@dataclass(frozen=True)
class Sample:
    response_ids: np.ndarray  # int32 [T]
    logprobs: np.ndarray  # float32 [T], behaviour policy μ's log-prob of each sampled token
    reward: float
    finish_reason: str  # "stop" | "length" | "abort"
    text: str
    verdict: str = ""


@dataclass(frozen=True)
class TrajectoryGroup:
    """All samples for one prompt, published by a generator once they are graded."""

    TAG: ClassVar[str] = "TrajectoryGroup"
    task_id: str
    prompt_ids: np.ndarray  # int32 [P]
    samples: tuple[Sample, ...]
    policy_version: int  # version of the weights at the first sampled token
    generator_id: str
    policy_version_last: int = -1  # version at the last token (== policy_version while loads happen between calls)
    timings: dict[str, float] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return encode(self.TAG, {
            "task_id": self.task_id, "prompt_ids": pack_i32(self.prompt_ids),
            "samples": _pack_samples(self.samples), "policy_version": self.policy_version,
            "policy_version_last": self.policy_version_last if self.policy_version_last >= 0
            else self.policy_version,
            "generator_id": self.generator_id, "timings": {k: float(v) for k, v in self.timings.items()},
        })

    @classmethod
    def from_bytes(cls, raw: bytes) -> TrajectoryGroup:
        d = decode(raw, cls.TAG)
        w = cls.TAG
        samples = _unpack_samples(get_field(d, "samples", dict, w), f"{w}.samples")
        timings = d.get("timings", {})
        if not isinstance(timings, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in timings.items()
        ):
            raise ProtocolError(f"{w}.timings: expected a map of str to number")
        version = get_field(d, "policy_version", int, w)
        version_last = get_field(d, "policy_version_last", int, w) if "policy_version_last" in d else version
        return cls(
            task_id=get_field(d, "task_id", str, w),
            prompt_ids=_unpack(get_field(d, "prompt_ids", bytes, w), "<i4", f"{w}.prompt_ids"),
            samples=samples,
            policy_version=version, generator_id=get_field(d, "generator_id", str, w),
            policy_version_last=version_last, timings=dict(timings),
        )


def _pack_samples(samples: tuple[Sample, ...]) -> dict[str, Any]:
    """A group's samples as columns: every sample's token ids in one packed array, its log-probs in another,
    split by `lengths` (decoding is a few array operations per group, not a dozen Python calls per sample)."""
    lengths = [len(s.response_ids) for s in samples]
    ids = np.concatenate([np.asarray(s.response_ids, dtype="<i4").ravel() for s in samples]) if samples else ()
    lps = np.concatenate([np.asarray(s.logprobs, dtype="<f4").ravel() for s in samples]) if samples else ()
    return {"lengths": pack_i32(lengths), "response_ids": pack_i32(ids), "logprobs": pack_f32(lps),
            "rewards": [float(s.reward) for s in samples], "finish_reasons": [s.finish_reason for s in samples],
            "texts": [s.text for s in samples], "verdicts": [s.verdict for s in samples]}


def _str_list(d: dict[str, Any], key: str, n: int, what: str) -> list[str]:
    values = get_field(d, key, list, what)
    if len(values) != n or not all(type(v) is str for v in values):
        raise ProtocolError(f"{what}.{key}: expected {n} strings")
    return values


def _unpack_samples(d: dict[str, Any], what: str) -> tuple[Sample, ...]:
    lengths = _unpack(get_field(d, "lengths", bytes, what), "<i4", f"{what}.lengths")
    n = lengths.size
    if n == 0:
        raise ProtocolError(f"{what}: no samples")
    if lengths.min() < 0:
        raise ProtocolError(f"{what}.lengths: negative length")
    ids = _unpack(get_field(d, "response_ids", bytes, what), "<i4", f"{what}.response_ids")
    lps = _unpack(get_field(d, "logprobs", bytes, what), "<f4", f"{what}.logprobs")
    total = int(lengths.sum(dtype=np.int64))
    if ids.size != total or lps.size != total:
        raise ProtocolError(f"{what}: lengths add up to {total} tokens, but {ids.size} response ids and "
                            f"{lps.size} logprobs arrived")
    # min is NaN if any is NaN and -inf if any is -inf: two reductions, no temporaries.
    if lps.size and not (math.isfinite(lps.min()) and lps.max() <= 1e-4):
        raise ProtocolError(f"{what}: logprobs must be finite and <= 0")
    rewards = get_field(d, "rewards", list, what)
    if len(rewards) != n or not all(type(r) in (int, float) and math.isfinite(r) for r in rewards):
        raise ProtocolError(f"{what}.rewards: expected {n} finite numbers")
    finish = _str_list(d, "finish_reasons", n, what)
    texts = _str_list(d, "texts", n, what)
    verdicts = _str_list(d, "verdicts", n, what) if "verdicts" in d else [""] * n
    cuts = np.cumsum(lengths[:-1])
    return tuple(Sample(i, lp, float(r), f, t, v) for i, lp, r, f, t, v in
                 zip(np.split(ids, cuts), np.split(lps, cuts), rewards, finish, texts, verdicts))


@dataclass(frozen=True)
class WeightsAnnouncement:
    """Stored at `{ns}:weights_meta` (services/control.py): where to join the weight-sync group
    and the flat layout of what will be broadcast (parameter names, shapes, dtype, bucket size)."""

    TAG: ClassVar[str] = "WeightsAnnouncement"
    rendezvous: str  # tcp://host:port
    world_size: int
    backend: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    bucket_bytes: int
    session: str
    members: tuple[str, ...] = ()  # generator ids; members[i] joins as rank i + 1 (empty: ranks by arrival)

    def to_bytes(self) -> bytes:
        return encode(self.TAG, {
            "rendezvous": self.rendezvous, "world_size": self.world_size, "backend": self.backend,
            "names": list(self.names), "shapes": [list(s) for s in self.shapes], "dtype": self.dtype,
            "bucket_bytes": self.bucket_bytes, "session": self.session, "members": list(self.members),
        })

    @classmethod
    def from_bytes(cls, raw: bytes) -> WeightsAnnouncement:
        d = decode(raw, cls.TAG)
        w = cls.TAG
        names = get_field(d, "names", list, w)
        shapes = get_field(d, "shapes", list, w)
        if len(names) != len(shapes) or not all(isinstance(n, str) for n in names):
            raise ProtocolError(f"{w}: names and shapes disagree")
        if not all(isinstance(s, list) and all(type(x) is int and x >= 0 for x in s) for s in shapes):
            raise ProtocolError(f"{w}.shapes: expected lists of non-negative ints")
        return cls(
            rendezvous=get_field(d, "rendezvous", str, w), world_size=get_field(d, "world_size", int, w),
            backend=get_field(d, "backend", str, w), names=tuple(names), shapes=tuple(tuple(s) for s in shapes),
            dtype=get_field(d, "dtype", str, w), bucket_bytes=get_field(d, "bucket_bytes", int, w),
            session=get_field(d, "session", str, w), members=_members(d.get("members", []), w),
        )


@dataclass(frozen=True)
class EvalResult:
    """A generator's graded samples of one eval prompt (`PromptTask.eval_round` ≥ 0), on `{ns}:evals`: never
    trained on, only counted into the accuracy of the evaluation at step `eval_round`."""

    TAG: ClassVar[str] = "EvalResult"
    task_id: str
    eval_round: int
    rewards: tuple[float, ...]
    policy_version: int  # weights at the first sampled token
    policy_version_last: int
    generator_id: str
    truncated: int = 0  # samples that hit max_tokens

    def to_bytes(self) -> bytes:
        return encode(self.TAG, {
            "task_id": self.task_id, "eval_round": self.eval_round, "rewards": pack_f32(self.rewards),
            "policy_version": self.policy_version, "policy_version_last": self.policy_version_last,
            "generator_id": self.generator_id, "truncated": self.truncated,
        })

    @classmethod
    def from_bytes(cls, raw: bytes) -> EvalResult:
        d = decode(raw, cls.TAG)
        w = cls.TAG
        rewards = _unpack(get_field(d, "rewards", bytes, w), "<f4", f"{w}.rewards")
        if not len(rewards) or not np.isfinite(rewards).all():
            raise ProtocolError(f"{w}.rewards: expected finite rewards, at least one")
        first, last = get_field(d, "policy_version", int, w), get_field(d, "policy_version_last", int, w)
        if first < 0 or last < first:
            raise ProtocolError(f"{w}: policy versions {first}..{last}")
        return cls(task_id=get_field(d, "task_id", str, w), eval_round=get_field(d, "eval_round", int, w),
                   rewards=tuple(float(r) for r in rewards), policy_version=first, policy_version_last=last,
                   generator_id=get_field(d, "generator_id", str, w), truncated=get_field(d, "truncated", int, w))


def _members(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value) or len(set(value)) != len(value):
        raise ProtocolError(f"{what}.members: expected a list of distinct strings")
    return tuple(value)


M = TypeVar("M", PromptTask, TrajectoryGroup, WeightsAnnouncement, EvalResult)

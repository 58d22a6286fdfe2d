"""The small messages of services/protocol.py (which re-exports them): the weight-sync announcement and an eval
prompt's result. Plain msgpack envelopes (services/envelope.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from services.envelope import ProtocolError, _unpack, decode, encode, get_field, pack_f32


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
    transport_threads: int = 1  # gloo devices every member opens (each rank must open the same number)

    def to_bytes(self) -> bytes:
        return encode(self.TAG, {
            "rendezvous": self.rendezvous, "world_size": self.world_size, "backend": self.backend,
            "names": list(self.names), "shapes": [list(s) for s in self.shapes], "dtype": self.dtype,
            "bucket_bytes": self.bucket_bytes, "session": self.session, "members": list(self.members),
            "transport_threads": self.transport_threads,
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
            transport_threads=_threads(d, w),
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


def _threads(d: dict[str, Any], what: str) -> int:
    n = get_field(d, "transport_threads", int, what) if "transport_threads" in d else 1
    if not 1 <= n <= 8:
        raise ProtocolError(f"{what}.transport_threads out of range: {n}")
    return n


def _members(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value) or len(set(value)) != len(value):
        raise ProtocolError(f"{what}.members: expected a list of distinct strings")
    return tuple(value)

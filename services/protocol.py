"""The messages that cross process boundaries, and their msgpack encoding (docs/architecture.md, "Messages").

Every message is a frozen dataclass with `to_bytes()` / `from_bytes()`. The envelope is a msgpack map
`{"v": SCHEMA_VERSION, "t": <type tag>, "d": <payload>}`; token ids and log-probs travel as packed
little-endian `int32` / `float32` byte strings, never as lists of Python numbers. Anything that does not
decode to exactly the declared shape raises `ProtocolError`, which the queue turns into a dead-letter
entry carrying the reason. Nothing here unpickles or evaluates received data.

A `TrajectoryGroup`, the one large message, is *framed* (schema 3, services/envelope.py): the same msgpack
map, with the header's length in `"h"` and the group's four arrays (prompt ids, lengths, every response's
ids, every log-prob) either in a binary field `"b"` at its end (`to_bytes`) or beside it as stream fields of
their own (`to_fields`, what generators XADD: no copy into a message). Readers parse the few-KB header and
take read-only numpy views over the received bytes. The frame is still one valid msgpack map, so a schema-2
reader fails with "unknown schema version 3", not garbage. Response texts travel only in the groups whose
prompt asked for them (`PromptTask.with_texts`: the learner's sample of texts to log); the learner trains on
ids. docs/architecture.md, "Messages".
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np

from services.envelope import (  # noqa: F401 - re-exported: the messages' one import
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    ProtocolError,
    _unpack,
    _view,
    decode,
    encode,
    frame,
    frame_arrays,
    get_field,
    is_framed,
    pack_f32,
    pack_i32,
    unframe,
)
from services.protocol_small import EvalResult, WeightsAnnouncement  # noqa: F401 - re-exported


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
    with_texts: bool = False  # the group answering it carries its response texts (the learner logs them)

    def to_bytes(self) -> bytes:
        return encode(self.TAG, {
            "task_id": self.task_id, "prompt": self.prompt, "reference": self.reference,
            "task_type": self.task_type, "n_samples": self.n_samples, "sampling": self.sampling.to_dict(),
            "feed_version": self.feed_version,
            "prompt_ids": None if self.prompt_ids is None else pack_i32(self.prompt_ids),
            "eval_round": self.eval_round, "with_texts": self.with_texts,
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
            with_texts=get_field(d, "with_texts", bool, w) if "with_texts" in d else False,
        )


class Sample(NamedTuple):  # a tuple: a 64-sample group decodes 64 of them, so construction must be cheap
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
    # Every sample's token ids back to back, as decoded (a view over the message): checks reduce it in one call.
    ids_all: np.ndarray | None = field(default=None, repr=False, compare=False)

    def response_ids_all(self) -> np.ndarray:
        if self.ids_all is not None:
            return self.ids_all
        return _column([s.response_ids for s in self.samples], _I32, sum(len(s.response_ids) for s in self.samples))

    lps_all: np.ndarray | None = field(default=None, repr=False, compare=False)  # the log-probs, likewise

    ARRAY_FIELDS: ClassVar[tuple[str, ...]] = ("p", "l", "i", "g")  # prompt ids, lengths, all ids, all log-probs

    @classmethod
    def build(cls, task_id: str, prompt_ids: Any, token_ids: Sequence[Any], logprobs: Sequence[Any],
              rewards: Sequence[float], finish_reasons: Sequence[str], texts: Sequence[str],
              verdicts: Sequence[str], policy_version: int, generator_id: str, policy_version_last: int = -1,
              timings: dict[str, float] | None = None) -> TrajectoryGroup:
        """A group from per-sample lists or arrays, its ids and log-probs laid out as one array each (one
        conversion for the group, and what `to_fields` sends as they are), each sample a view into them."""
        lengths = [len(t) for t in token_ids]
        ids_all, lps_all = _column(token_ids, _I32, sum(lengths)), _column(logprobs, _F32, sum(lengths))
        ends = np.cumsum(lengths).tolist()
        samples = tuple(Sample(ids_all[a:b], lps_all[a:b], float(r), f, t, v) for a, b, r, f, t, v in
                        zip([0, *ends[:-1]], ends, rewards, finish_reasons, texts, verdicts, strict=True))
        return cls(task_id, _as(prompt_ids, _I32), samples, policy_version, generator_id, policy_version_last,
                   dict(timings or {}), ids_all, lps_all)

    def _payload(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id, "policy_version": self.policy_version,
            "policy_version_last": self.policy_version_last if self.policy_version_last >= 0
            else self.policy_version,
            "generator_id": self.generator_id, "timings": {k: float(v) for k, v in self.timings.items()},
            "samples": _sample_fields(self.samples),
        }

    def _arrays(self) -> list[np.ndarray]:
        lengths = np.fromiter((len(s.response_ids) for s in self.samples), dtype=_I32, count=len(self.samples))
        lps = self.lps_all if self.lps_all is not None else _column([s.logprobs for s in self.samples], _F32,
                                                                     int(lengths.sum()))
        return [_as(self.prompt_ids, _I32), lengths, _as(self.response_ids_all(), _I32), _as(lps, _F32)]

    def to_bytes(self) -> bytes:
        """One framed message, the arrays in its blob (dead letters, the learner's ranks)."""
        return frame(self.TAG, self._payload(), self._arrays())

    def to_fields(self) -> dict[str, Any]:
        """The stream entry's fields: `m`, the frame without its arrays, then each array as a field of its own,
        so the group's token ids and log-probs go to Redis as they lie, with no copy into a message."""
        arrays = self._arrays()
        return {"m": frame(self.TAG, self._payload(), arrays, external=True),
                **{name: memoryview(a).cast("B") for name, a in zip(self.ARRAY_FIELDS, arrays)}}

    @classmethod
    def from_bytes(cls, raw: bytes) -> TrajectoryGroup:
        """Decodes and validates a group; its arrays are read-only views over `raw`, which they keep alive."""
        d, blob = unframe(raw, cls.TAG)
        bounds = np.cumsum([0, *d["arrays"]]).tolist()
        return cls._decode(d, [blob[a:b] for a, b in zip(bounds[:-1], bounds[1:])])

    @classmethod
    def from_fields(cls, fields: dict[Any, Any]) -> TrajectoryGroup:
        """A group from a stream entry's fields (`to_fields`; one `m` holding the whole frame also decodes),
        its arrays read-only views over the received field values."""
        got = {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}
        if set(got) == {"m"}:
            return cls.from_bytes(got["m"])
        if set(got) != {"m", *cls.ARRAY_FIELDS}:
            raise ProtocolError(f"{cls.TAG}: stream fields {sorted(got)[:8]}, expected m and {cls.ARRAY_FIELDS}")
        d, _ = unframe(got["m"], cls.TAG, external=True)
        arrays = []
        for name in cls.ARRAY_FIELDS:
            value = got[name]
            if not isinstance(value, bytes):
                raise ProtocolError(f"{cls.TAG}.{name}: expected bytes")
            arrays.append(np.frombuffer(value, np.uint8))
        if [a.nbytes for a in arrays] != d["arrays"]:
            raise ProtocolError(f"{cls.TAG}: array fields of {[a.nbytes for a in arrays]} bytes, the frame says "
                                f"{d['arrays']}")
        return cls._decode(d, arrays)

    @classmethod
    def _decode(cls, d: dict[str, Any], arrays: list[np.ndarray]) -> TrajectoryGroup:
        w = cls.TAG
        if len(arrays) != 4:
            raise ProtocolError(f"{w}: {len(arrays)} arrays, expected prompt ids, lengths, ids and log-probs")
        prompt_ids = _view(arrays[0], "<i4", f"{w}.prompt_ids")
        lengths = _view(arrays[1], "<i4", f"{w}.lengths")
        ids_all, lps_all = _view(arrays[2], "<i4", f"{w}.response_ids"), _view(arrays[3], "<f4", f"{w}.logprobs")
        n = lengths.size
        if n == 0:
            raise ProtocolError(f"{w}.samples: no samples")
        if lengths.min() < 0:
            raise ProtocolError(f"{w}.lengths: negative length")
        total = int(lengths.sum(dtype=np.int64))
        if ids_all.size != total or lps_all.size != total:
            raise ProtocolError(f"{w}: lengths add up to {total} tokens, but {ids_all.size} response ids and "
                                f"{lps_all.size} logprobs arrived")
        # min is NaN if any is NaN and -inf if any is -inf: two reductions, no temporaries.
        if lps_all.size and not (math.isfinite(lps_all.min()) and lps_all.max() <= 1e-4):
            raise ProtocolError(f"{w}.samples: logprobs must be finite and <= 0")
        rewards, finish, verdicts, texts = _sample_columns(get_field(d, "samples", dict, w), n, f"{w}.samples")
        timings = d.get("timings", {})
        if not isinstance(timings, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in timings.items()
        ):
            raise ProtocolError(f"{w}.timings: expected a map of str to number")
        version = get_field(d, "policy_version", int, w)
        version_last = get_field(d, "policy_version_last", int, w) if "policy_version_last" in d else version
        ends = np.cumsum(lengths).tolist()
        cuts = list(map(slice, [0, *ends[:-1]], ends))
        # map over C-level callables: a 64-sample group is 128 slices and 64 tuples, no Python frame per sample
        samples = tuple(map(Sample._make, zip(map(ids_all.__getitem__, cuts), map(lps_all.__getitem__, cuts),
                                              rewards, finish, texts, verdicts)))
        return cls(
            task_id=get_field(d, "task_id", str, w), prompt_ids=prompt_ids, samples=samples,
            policy_version=version, generator_id=get_field(d, "generator_id", str, w),
            policy_version_last=version_last, timings=dict(timings), ids_all=ids_all, lps_all=lps_all,
        )


_I32, _F32 = np.dtype("<i4"), np.dtype("<f4")


def _column(parts: Sequence[Any], dtype: np.dtype, total: int) -> np.ndarray:
    """Per-sample lists or arrays as one array: one conversion (lists) or one copy (arrays) for the group."""
    if all(type(p) is np.ndarray for p in parts):
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)
    return np.fromiter(itertools.chain.from_iterable(parts), dtype=dtype, count=total)


def _as(values: Any, dtype: np.dtype) -> np.ndarray:
    """`values` as a contiguous array of `dtype`: itself when it already is one (the usual case, and free)."""
    if type(values) is np.ndarray and values.dtype == dtype and values.flags.c_contiguous:
        return values
    return np.ascontiguousarray(values, dtype=dtype)


def _sample_fields(samples: tuple[Sample, ...]) -> dict[str, Any]:
    """What a group says of each sample besides its arrays; texts only where there are any."""
    out: dict[str, Any] = {"rewards": [float(s.reward) for s in samples],
                           "finish_reasons": [s.finish_reason for s in samples],
                           "verdicts": [s.verdict for s in samples]}
    if any(s.text for s in samples):
        out["texts"] = [s.text for s in samples]
    return out


def _str_list(d: dict[str, Any], key: str, n: int, what: str) -> list[str]:
    values = get_field(d, key, list, what)
    if len(values) != n or (n and set(map(type, values)) != {str}):
        raise ProtocolError(f"{what}.{key}: expected {n} strings")
    return values


def _sample_columns(d: dict[str, Any], n: int, what: str) -> tuple[list[float], list[str], list[str], list[str]]:
    rewards = get_field(d, "rewards", list, what)
    # the types in one pass (bool is not a number here), then finiteness: a sum is finite only if every term is
    if len(rewards) != n or not set(map(type, rewards)) <= {int, float} or not math.isfinite(sum(rewards)):
        raise ProtocolError(f"{what}.rewards: expected {n} finite numbers")
    finish = _str_list(d, "finish_reasons", n, what)
    verdicts = _str_list(d, "verdicts", n, what) if "verdicts" in d else [""] * n
    texts = _str_list(d, "texts", n, what) if "texts" in d else [""] * n
    return list(map(float, rewards)), finish, verdicts, texts


M = TypeVar("M", PromptTask, TrajectoryGroup, WeightsAnnouncement, EvalResult)


def stream_fields(msg: Any) -> dict[str, Any]:
    """A message's Redis stream fields: `m` holding `to_bytes()`, or `m` and its arrays (`to_fields`)."""
    to_fields = getattr(msg, "to_fields", None)
    return to_fields() if to_fields is not None else {"m": msg.to_bytes()}


def from_stream_fields(cls: type[M], fields: dict[Any, Any]) -> M:
    """The message of a stream entry's fields (which hold `m`); raises ProtocolError."""
    from_fields = getattr(cls, "from_fields", None)
    if from_fields is not None:
        return from_fields(fields)
    return cls.from_bytes(fields.get(b"m", fields.get("m")))

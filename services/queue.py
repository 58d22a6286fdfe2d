"""Redis Streams with consumer groups: the queues between learner and generators (docs/architecture.md).

The learner XADDs `PromptTask`s, generators read them with XREADGROUP (group `generators`), publish one
`TrajectoryGroup` (or `EvalResult`) each and XACK the prompt; the learner reads those (group `learner`). A
consumer that dies between read and ack leaves its entries pending, and a live one takes them over with
XAUTOCLAIM (`reclaim`). Delivery is therefore at least once: a duplicate keeps its `task_id`. An entry that
does not decode to the queue's message type (no field `m`, or a `ProtocolError`) is copied to the dead-letter
stream with the reason and acked on its own stream, so it is never retried forever; readers only ever see
well-formed messages.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, Generic

import msgpack
import redis

from services.control import Keys
from services.protocol import (
    EvalResult,
    M,
    PromptTask,
    ProtocolError,
    TrajectoryGroup,
    from_stream_fields,
    stream_fields,
)

log = logging.getLogger("orz.queue")

FIELD = "m"  # a stream entry's message field: `msg.to_bytes()`, or a frame whose arrays follow it (protocol)
GENERATOR_GROUP = "generators"  # consumer group on the prompt stream
LEARNER_GROUP = "learner"  # consumer group on the trajectory and eval streams
DEAD_MAXLEN = 10_000  # a flood of junk must not fill Redis's memory; the newest dead letters are kept


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _is_nogroup(exc: redis.ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


def _is_unblocked(exc: redis.ResponseError) -> bool:
    """Redis 7 wakes a blocked XREADGROUP with this when its stream is deleted (a restarted learner
    resetting the streams): the group went with it."""
    return str(exc).startswith("UNBLOCKED")


def _next_id(entry_id: str) -> str:
    """The smallest stream id greater than `entry_id` (ids are `<ms>-<seq>`)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class StreamQueue(Generic[M]):
    """One stream read by one consumer group, carrying one message type from `services/protocol.py`.

    The client must return bytes (`services.redis_client.connect` does), and a blocking `read` must block
    for less than the client's socket timeout. `maxlen` caps the stream with approximate trimming on XADD;
    that drops the oldest entries whether or not they were delivered, so leave it None for queues whose
    every entry matters and call `trim_acked()` instead. `max_deliveries`, when set, sends an entry that
    has been delivered more often than that (a message that keeps killing its consumer) to the dead-letter
    stream on reclaim, so it cannot take down every generator in turn.
    """

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        group: str,
        message_cls: type[M],
        dead_stream: str,
        maxlen: int | None = None,
        max_deliveries: int | None = None,
    ) -> None:
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("StreamQueue needs a client with decode_responses=False (payloads are binary)")
        if maxlen is not None and maxlen < 1:
            raise ValueError(f"maxlen must be >= 1 or None, got {maxlen}")
        if max_deliveries is not None and max_deliveries < 1:
            raise ValueError(f"max_deliveries must be >= 1 or None, got {max_deliveries}")
        self.client = client
        self.stream = stream
        self.group = group
        self.message_cls = message_cls
        self.dead_stream = dead_stream
        self.maxlen = maxlen
        self.max_deliveries = max_deliveries
        self.dead_lettered = 0  # entries this instance moved to the dead-letter stream, for a metric

    def __repr__(self) -> str:
        return f"StreamQueue({self.stream!r}, group={self.group!r}, {self.message_cls.__name__})"

    def ensure_group(self, start_id: str = "0") -> bool:
        """Create the stream and its group if missing; True if created. Idempotent, so every process calls it.
        The group starts at id "0", not "$": prompts fed before the first generator came up must be delivered."""
        try:
            self.client.xgroup_create(self.stream, self.group, id=start_id, mkstream=True)
        except redis.ResponseError as exc:
            if str(exc).startswith("BUSYGROUP"):
                return False
            raise
        return True

    def _check_type(self, msg: Any) -> None:
        if not isinstance(msg, self.message_cls):
            raise TypeError(f"{self!r} carries {self.message_cls.__name__}, not {type(msg).__name__}")

    def add(self, msg: M) -> str:
        """XADD one message; returns its entry id."""
        self._check_type(msg)
        entry_id = self.client.xadd(
            self.stream, stream_fields(msg), maxlen=self.maxlen, approximate=self.maxlen is not None
        )
        return _str(entry_id)

    def add_many(self, msgs: Iterable[M]) -> list[str]:
        """XADD several messages in one round trip (the feeder tops the queue up in batches)."""
        pipe = self.client.pipeline(transaction=False)
        self.add_to(pipe, msgs)
        return [_str(entry_id) for entry_id in pipe.execute()] if len(pipe) else []

    def add_to(self, pipe: redis.client.Pipeline, msgs: Iterable[M]) -> None:
        """Queue an XADD per message on `pipe`, which its caller executes (services/publish.py)."""
        for msg in msgs:
            self._check_type(msg)
            pipe.xadd(self.stream, stream_fields(msg), maxlen=self.maxlen, approximate=self.maxlen is not None)

    def _with_group(self, call: Callable[[], Any]) -> Any:
        """Run `call`; if the group vanished (Redis restarted without persistence, key deleted, even while
        the call was blocked on it), recreate it once and retry, so consumers keep going instead of crashing."""
        try:
            return call()
        except redis.ResponseError as exc:
            if _is_unblocked(exc):  # woken by the deletion: nothing was read, and the wait is used up
                log.warning("%r: stream deleted during a blocking read; recreating the group", self)
                self.ensure_group()
                return None
            if not _is_nogroup(exc):
                raise
            log.warning("%r: consumer group missing; recreating it", self)
            self.ensure_group()
            return call()

    def read(self, consumer: str, count: int, block_ms: int | None = None) -> list[tuple[str, M]]:
        """Up to `count` new entries for `consumer` (XREADGROUP `>`), oldest first, waiting at most `block_ms`
        (None: no wait; 0, forever, is refused: every network call needs a timeout). Pending until `ack`ed."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        if block_ms is not None:
            if block_ms <= 0:
                raise ValueError("block_ms must be > 0 or None; 0 would block forever")
            timeout = self.client.connection_pool.connection_kwargs.get("socket_timeout")
            if timeout is not None and block_ms / 1000 >= timeout:
                raise ValueError(f"block_ms={block_ms} must be shorter than the socket timeout ({timeout}s)")
        reply = self._with_group(
            partial(
                self.client.xreadgroup, self.group, consumer, {self.stream: ">"}, count=count, block=block_ms
            )
        )
        return self._decode_entries(self._entries_of(reply))

    def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[tuple[str, M]]:
        """Take over up to `count` entries that have been pending longer than `min_idle_ms` (XAUTOCLAIM): how the
        work of a consumer that died between read and ack gets done. The entries move to `consumer`, which
        handles them as if freshly read. Scans the whole pending list from "0-0"."""
        if count < 1 or min_idle_ms < 0:
            raise ValueError(f"need count >= 1 and min_idle_ms >= 0, got {count} and {min_idle_ms}")
        # XPENDING IDLE first, the whole cost when nothing is idle: XAUTOCLAIM scans COUNT × 10 entries a call, so
        # a pending list of thousands took dozens of calls per look per generator (bench/simulate.py: 9,757/step).
        if not self._with_group(partial(self.client.xpending_range, self.stream, self.group, "-", "+", 1,
                                        idle=min_idle_ms)):
            return []
        out: list[tuple[str, M]] = []
        cursor = "0-0"
        while len(out) < count:
            reply = self._with_group(
                partial(
                    self.client.xautoclaim,
                    self.stream,
                    self.group,
                    consumer,
                    min_idle_ms,
                    start_id=cursor,
                    count=count - len(out),
                )
            )
            cursor = _str(reply[0])
            entries = [(e[0], e[1]) for e in reply[1]]
            deleted = [_str(i) for i in reply[2]] if len(reply) > 2 else []
            # Redis 6.2 returns entries deleted from the stream as nil; 7.x lists their ids separately.
            deleted += [_str(i) for i, fields in entries if i is not None and fields is None]
            entries = [(i, f) for i, f in entries if i is not None and f is not None]
            for entry_id in deleted:
                self._dead_letter(entry_id, b"", "entry was deleted from the stream (trimmed?) while pending")
            entries = self._drop_redelivered(entries)
            out.extend(self._decode_entries(entries))
            if cursor == "0-0":
                break
        return out

    def _drop_redelivered(self, entries: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        """Dead-letter the entries delivered more than `max_deliveries` times; keep the rest."""
        if self.max_deliveries is None or not entries:
            return entries
        pipe = self.client.pipeline(transaction=False)
        for entry_id, _ in entries:
            pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
        times = {_str(d["message_id"]): int(d["times_delivered"]) for reply in pipe.execute() for d in reply}
        keep = []
        for entry_id, fields in entries:
            n = times.get(_str(entry_id), 0)
            if n > self.max_deliveries:
                raw = fields.get(FIELD.encode(), b"") if isinstance(fields, dict) else b""
                self._dead_letter(
                    _str(entry_id), raw, f"delivered {n} times (max_deliveries={self.max_deliveries})"
                )
            else:
                keep.append((entry_id, fields))
        return keep

    def ack(self, entry_ids: Sequence[str | bytes]) -> int:
        """XACK: the entries are done and leave the pending list; returns how many were pending."""
        if not entry_ids:
            return 0
        return int(self.client.xack(self.stream, self.group, *entry_ids))

    def ack_to(self, pipe: redis.client.Pipeline, entry_ids: Sequence[str | bytes]) -> None:
        if entry_ids:  # queued on `pipe`, as `add_to`
            pipe.xack(self.stream, self.group, *entry_ids)

    @staticmethod
    def _entries_of(reply: Any) -> list[tuple[Any, Any]]:
        """The (id, fields) list of our one stream, from a RESP2 (list) or RESP3 (dict) XREADGROUP reply."""
        if not reply:
            return []
        if isinstance(reply, dict):
            streams = list(reply.values())
            entries = streams[0] if streams else []
            # RESP3 wraps the entry list in one more list
            if (
                entries
                and isinstance(entries[0], list)
                and (not entries[0] or isinstance(entries[0][0], tuple))
            ):
                entries = entries[0]
        else:
            entries = reply[0][1]
        return [(e[0], e[1]) for e in entries]

    def _decode_entries(self, entries: Iterable[tuple[Any, Any]]) -> list[tuple[str, M]]:
        good: list[tuple[str, M]] = []
        for raw_id, fields in entries:
            entry_id = _str(raw_id)
            fields = fields or {}
            payload = fields.get(FIELD.encode(), fields.get(FIELD))
            if payload is None:
                # keep whatever the entry did hold, so the dead letter can be inspected
                raw = msgpack.packb({_str(k): v for k, v in fields.items()}, use_bin_type=True)
                self._dead_letter(entry_id, raw, f"missing field {FIELD!r}")
                continue
            try:
                good.append((entry_id, from_stream_fields(self.message_cls, fields)))
            except ProtocolError as exc:
                raw = payload if len(fields) == 1 else msgpack.packb({_str(k): v for k, v in fields.items()},
                                                                     use_bin_type=True)
                self._dead_letter(entry_id, raw, f"{self.message_cls.__name__}: {exc}")
        return good

    def reject(self, entry_id: str, reason: str, raw: bytes = b"") -> None:
        """Dead-letter an entry that decoded but cannot be used (its consumer checked it against what it
        expected: a prompt the engine refuses, a group that does not answer the task that was fed)."""
        self._dead_letter(entry_id, raw, reason)

    def _dead_letter(self, entry_id: str, raw: bytes, reason: str) -> None:
        """Copy the entry to the dead-letter stream and ack it here, atomically, so it is handled once."""
        log.warning("%r: entry %s dead-lettered: %s", self, entry_id, reason)
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(
            self.dead_stream,
            {"reason": reason, "stream": self.stream, "entry_id": entry_id, "raw": raw},
            maxlen=DEAD_MAXLEN,
            approximate=True,
        )
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()
        self.dead_lettered += 1

    def renew(self, consumer: str, entry_ids: Iterable[str]) -> int:
        """Resets the idle time of those of `entry_ids` still pending on `consumer` (XCLAIM JUSTID to itself),
        so `reclaim` by a peer takes only the entries of a consumer that stopped renewing. Returns how many."""
        held = set(entry_ids)
        if not held:
            return 0
        mine = self.client.xpending_range(self.stream, self.group, "-", "+", len(held) + 64, consumername=consumer)
        ids = [p["message_id"] for p in mine if _str(p["message_id"]) in held]
        if ids:
            self.client.xclaim(self.stream, self.group, consumer, 0, ids, justid=True)
        return len(ids)


    def task_ids(self) -> set[str]:
        """The `task_id` of every entry in the stream, delivered or not (junk is skipped: its reader
        dead-letters it). What the learner's accounting looks for when it asks whether a task is lost."""
        out: set[str] = set()
        for _, fields in self.client.xrange(self.stream):
            try:
                out.add(from_stream_fields(self.message_cls, fields).task_id)
            except (KeyError, ProtocolError):
                pass
        return out

    def pending_count(self) -> int:
        """Entries delivered to some consumer and not yet acked (0 before the group exists)."""
        try:
            return int(self.client.xpending(self.stream, self.group)["pending"])
        except redis.ResponseError as exc:
            if _is_nogroup(exc):
                return 0
            raise

    def length(self) -> int:
        """Entries in the stream, acked ones included until trimmed (XLEN)."""
        return int(self.client.xlen(self.stream))

    def _group_info(self) -> dict[str, Any] | None:
        try:
            groups = self.client.xinfo_groups(self.stream)
        except redis.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise
        for g in groups:
            if _str(g["name"]) == self.group:
                return g
        return None

    def backlog(self) -> int:
        """Entries not yet delivered to the group: what the feeder and the lag metric look at.

        Uses XINFO GROUPS `lag` (Redis ≥ 7). Where Redis cannot say (older servers, or deletions in the
        range), it counts the entries after the group's last-delivered id, up to 100k.
        """
        info = self._group_info()
        if info is None:
            return self.length()
        lag = info.get("lag")
        if isinstance(lag, int):
            return lag
        last = _str(info["last-delivered-id"])
        return len(self.client.xrange(self.stream, min=f"({last}", max="+", count=100_000))

    def trim_acked(self) -> int:
        """XTRIM MINID the entries every group has delivered and acked; returns how many were removed. Acked
        entries otherwise stay in Redis's memory forever; nothing pending or undelivered is touched, which
        plain MAXLEN trimming cannot promise."""
        try:
            groups = self.client.xinfo_groups(self.stream)
        except redis.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return 0
            raise
        if not groups:
            return 0
        bounds = []
        for g in groups:
            bound = _next_id(_str(g["last-delivered-id"]))
            if int(g["pending"]) > 0:
                oldest = self.client.xpending(self.stream, _str(g["name"]))["min"]
                if oldest is not None:
                    bound = min(bound, _str(oldest), key=_id_key)
            bounds.append(bound)
        minid = min(bounds, key=_id_key)
        return int(self.client.xtrim(self.stream, minid=minid, approximate=False))


def prompt_queue(client: redis.Redis, keys: Keys) -> StreamQueue[PromptTask]:
    """The learner → generators queue (group `generators`)."""
    return StreamQueue(client, keys.prompts, GENERATOR_GROUP, PromptTask, keys.dead)


def trajectory_queue(client: redis.Redis, keys: Keys) -> StreamQueue[TrajectoryGroup]:
    """The generators → learner queue (group `learner`)."""
    return StreamQueue(client, keys.trajectories, LEARNER_GROUP, TrajectoryGroup, keys.dead)


def eval_queue(client: redis.Redis, keys: Keys) -> StreamQueue[EvalResult]:
    """The generators → learner queue of eval results (group `learner`)."""
    return StreamQueue(client, keys.evals, LEARNER_GROUP, EvalResult, keys.dead)

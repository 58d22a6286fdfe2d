"""The control plane: every Redis key of a run, and every call on the keys that are not streams.

Streams (prompts, trajectories, evals, dead letters) go through `services/queue.py`. Everything else the
processes tell each other lives in a few keys, each holding one of the typed messages below (encoded in the
envelope of `services/protocol.py`):

| key | type | written by | read by |
|---|---|---|---|
| `{ns}:policy_version` | int (decimal string) | learner, after every step | generators (backpressure), `orz up` |
| `{ns}:generators` | hash: id → `Heartbeat` | each generator, every `heartbeat_s` | learner (weight-sync members) |
| `{ns}:weights_meta` | `WeightsAnnouncement` | learner, when it forms a weight-sync group | generators |
| `{ns}:checkpoint` | `CheckpointPointer` | learner, after each checkpoint | a generator that starts late |

`RankCommand` is the one control message that does not go through Redis: learner rank 0 sends it to the
other data-parallel ranks (learner/parallel.py).

No process package calls Redis itself (tests/unit/test_boundaries.py): a shape changed here
changes for every reader at once, and a message that does not decode is logged and skipped, never trusted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from services.protocol import ProtocolError, TrajectoryGroup, WeightsAnnouncement, decode, encode, get_field

log = logging.getLogger("orz.control")
MAX_RANK_COMMAND_BYTES = 2**34


@dataclass(frozen=True)
class Heartbeat:
    """A generator's liveness and state, in the hash `{ns}:generators` under its id, every `heartbeat_s`."""

    TAG: ClassVar[str] = "Heartbeat"
    ts: float  # when it was written (the generator's clock)
    version: int  # weights version loaded
    pid: int
    host: str
    started: float
    busy_s: float  # cumulative seconds in engine steps with requests in flight
    layout: str | None = None  # digest of the served model's parameter names and shapes (None: unchecked)

    def to_bytes(self) -> bytes:
        return encode(self.TAG, {"ts": self.ts, "version": self.version, "pid": self.pid, "host": self.host,
                                  "started": self.started, "busy_s": self.busy_s, "layout": self.layout})

    @classmethod
    def from_bytes(cls, raw: bytes) -> Heartbeat:
        d = decode(raw, cls.TAG)
        w = cls.TAG
        layout = d.get("layout")
        if layout is not None and not isinstance(layout, str):
            raise ProtocolError(f"{w}.layout: expected a string or nil")
        return cls(ts=float(get_field(d, "ts", (int, float), w)), version=get_field(d, "version", int, w),
                   pid=get_field(d, "pid", int, w), host=get_field(d, "host", str, w),
                   started=float(get_field(d, "started", (int, float), w)),
                   busy_s=float(get_field(d, "busy_s", (int, float), w)), layout=layout)


@dataclass(frozen=True)
class CheckpointPointer:
    """`{ns}:checkpoint`: the learner's newest complete checkpoint, where a generator joining late loads from."""

    TAG: ClassVar[str] = "CheckpointPointer"
    path: str
    version: int

    def to_bytes(self) -> bytes:
        return encode(self.TAG, {"path": self.path, "version": self.version})

    @classmethod
    def from_bytes(cls, raw: bytes) -> CheckpointPointer:
        d = decode(raw, cls.TAG)
        return cls(path=get_field(d, "path", str, cls.TAG), version=get_field(d, "version", int, cls.TAG))


@dataclass(frozen=True)
class RankCommand:
    """Learner rank 0 → the other data-parallel ranks (learner/parallel.py): what comes next."""

    TAG: ClassVar[str] = "RankCommand"
    BATCH, CHECKPOINT, FINAL, STOP = 0, 1, 2, 3
    cmd: int
    groups: tuple[TrajectoryGroup, ...] = ()  # the step's batch (BATCH only)

    def to_bytes(self) -> bytes:
        return encode(self.TAG, {"cmd": self.cmd, "groups": [g.to_bytes() for g in self.groups]})

    @classmethod
    def from_bytes(cls, raw: bytes) -> RankCommand:
        # A whole batch (ORZ's: 128 groups of up to ~1 MB each) between the learner's own ranks: each group
        # inside is still held to MAX_MESSAGE_BYTES.
        d = decode(raw, cls.TAG, max_bytes=MAX_RANK_COMMAND_BYTES)
        cmd = get_field(d, "cmd", int, cls.TAG)
        if cmd not in (cls.BATCH, cls.CHECKPOINT, cls.FINAL, cls.STOP):
            raise ProtocolError(f"{cls.TAG}.cmd: unknown command {cmd}")
        groups = get_field(d, "groups", list, cls.TAG)
        if not all(isinstance(g, bytes) for g in groups):
            raise ProtocolError(f"{cls.TAG}.groups: expected a list of encoded groups")
        return cls(cmd, tuple(TrajectoryGroup.from_bytes(g) for g in groups))


@dataclass(frozen=True)
class Keys:
    """Every Redis key of one run, under its namespace `orz:<run_name>` (docs/architecture.md, "Keys")."""

    ns: str

    @property
    def prompts(self) -> str:
        """Stream of `PromptTask`, written by the learner's feeder (training prompts and eval prompts)."""
        return f"{self.ns}:prompts"

    @property
    def trajectories(self) -> str:
        """Stream of `TrajectoryGroup`, written by generators."""
        return f"{self.ns}:trajectories"

    @property
    def evals(self) -> str:
        """Stream of `EvalResult`: graded samples of eval prompts, never trained on."""
        return f"{self.ns}:evals"

    @property
    def dead(self) -> str:
        """Stream of entries that could not be decoded or processed, with the reason."""
        return f"{self.ns}:dead"

    @property
    def policy_version(self) -> str:
        """String key: the learner's current policy version (int)."""
        return f"{self.ns}:policy_version"

    @property
    def checkpoint(self) -> str:
        """String key: `CheckpointPointer` to the learner's newest complete checkpoint (late joiners)."""
        return f"{self.ns}:checkpoint"

    @property
    def generators(self) -> str:
        """Hash of generator id → `Heartbeat`."""
        return f"{self.ns}:generators"

    @property
    def weights_meta(self) -> str:
        """String key: the current weight-sync group's `WeightsAnnouncement`."""
        return f"{self.ns}:weights_meta"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ControlPlane:
    """Typed reads and writes of a run's control keys over one Redis client (bytes replies)."""

    def __init__(self, redis: Any, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    # -- policy version -------------------------------------------------------------------------------------
    def set_policy_version(self, version: int) -> None:
        self.redis.set(self.keys.policy_version, int(version))

    def policy_version(self) -> int | None:
        raw = self.redis.get(self.keys.policy_version)
        return None if raw is None else int(raw)

    # -- heartbeats -----------------------------------------------------------------------------------------
    def beat(self, generator_id: str, beat: Heartbeat) -> None:
        self.redis.hset(self.keys.generators, generator_id, beat.to_bytes())

    def leave(self, generator_id: str) -> None:
        self.redis.hdel(self.keys.generators, generator_id)

    def heartbeats(self) -> dict[str, Heartbeat]:
        """Every generator's last heartbeat; one that does not decode is logged and left out."""
        out = {}
        for gid, raw in self.redis.hgetall(self.keys.generators).items():
            gid = _text(gid)
            try:
                out[gid] = Heartbeat.from_bytes(raw)
            except ProtocolError as exc:
                log.warning("unreadable heartbeat of %r in %s: %s", gid, self.keys.generators, exc)
        return out

    def generator_count(self) -> int:
        return int(self.redis.hlen(self.keys.generators))

    # -- weight-sync announcements --------------------------------------------------------------------------
    def announce(self, ann: WeightsAnnouncement) -> None:
        self.redis.set(self.keys.weights_meta, ann.to_bytes())

    def withdraw_announcement(self) -> None:
        self.redis.delete(self.keys.weights_meta)

    def announcement(self) -> WeightsAnnouncement | None:
        """The current announcement, or None; raises ProtocolError when it does not decode."""
        raw = self.redis.get(self.keys.weights_meta)
        return None if raw is None else WeightsAnnouncement.from_bytes(raw)

    # -- checkpoint pointer ---------------------------------------------------------------------------------
    def publish_checkpoint(self, pointer: CheckpointPointer) -> None:
        self.redis.set(self.keys.checkpoint, pointer.to_bytes())

    def checkpoint(self) -> CheckpointPointer | None:
        raw = self.redis.get(self.keys.checkpoint)
        if raw is None:
            return None
        try:
            return CheckpointPointer.from_bytes(raw)
        except ProtocolError as exc:
            log.warning("unreadable checkpoint pointer in %s: %s", self.keys.checkpoint, exc)
            return None

    # -- the run's namespace and the server -----------------------------------------------------------------
    def reset(self) -> None:
        """Empties the run's streams and control keys (a run, fresh or resumed, starts from empty streams)."""
        k = self.keys
        self.redis.delete(k.prompts, k.trajectories, k.evals, k.policy_version, k.weights_meta, k.checkpoint)

    def server_run_id(self) -> str:
        """Redis's `run_id`: a new one means the server restarted (and may have lost its last writes)."""
        return _text(self.redis.info("server")["run_id"])

    def server_cpu_s(self) -> float:
        """CPU seconds the Redis server has used (system + user), for the orchestration-overhead figures."""
        info = self.redis.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def memory(self) -> tuple[int, int]:
        """(used_memory, maxmemory) in bytes; maxmemory 0 means no limit."""
        mem = self.redis.info("memory")
        return int(mem["used_memory"]), int(mem.get("maxmemory", 0))

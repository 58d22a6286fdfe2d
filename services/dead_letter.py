"""Reading the dead-letter stream `{ns}:dead`: entries a consumer could not decode or process, each with the
reason and the bytes exactly as received (`StreamQueue` writes them; services/queue.py)."""

from __future__ import annotations

from dataclasses import dataclass

import redis


@dataclass(frozen=True)
class DeadLetter:
    """One entry of the dead-letter stream: why, where from, and the bytes exactly as they were received."""

    id: str  # id in the dead-letter stream
    reason: str
    stream: str  # the stream the bad entry came from
    entry_id: str  # its id there
    raw: bytes


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def dead_letters(client: redis.Redis, stream: str, count: int = 100) -> list[DeadLetter]:
    """The oldest `count` entries of a dead-letter stream (e.g. `Keys(ns).dead`), for tests and tools."""
    out = []
    for raw_id, fields in client.xrange(stream, count=count):
        f = {_str(k): v for k, v in fields.items()}
        out.append(
            DeadLetter(
                id=_str(raw_id),
                reason=_str(f.get("reason", b"")),
                stream=_str(f.get("stream", b"")),
                entry_id=_str(f.get("entry_id", b"")),
                raw=f.get("raw", b"") if isinstance(f.get("raw", b""), bytes) else str(f["raw"]).encode(),
            )
        )
    return out

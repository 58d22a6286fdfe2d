"""A generator's publish in one round trip: its results XADDed and the prompts they answer XACKed together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.queue import StreamQueue


def publish_and_ack(outputs: Sequence[tuple[StreamQueue, Sequence[Any]]], source: StreamQueue,
                    entry_ids: Sequence[str]) -> None:
    """XADD each queue's messages and XACK `entry_ids` on `source`, in one MULTI/EXEC: one round trip, and
    Redis applies all of it or none (a generator's results and the acks of the prompts they answer)."""
    client = source.client
    if any(q.client is not client for q, _ in outputs):
        raise ValueError("publish_and_ack: every queue must share one Redis client")
    pipe = client.pipeline(transaction=True)
    for queue, msgs in outputs:
        queue.add_to(pipe, msgs)
    source.ack_to(pipe, entry_ids)
    pipe.execute()

"""A generator's publish: its results XADDed in one pipeline, then the prompts they answer XACKed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.queue import StreamQueue


def publish_and_ack(outputs: Sequence[tuple[StreamQueue, Sequence[Any]]], source: StreamQueue,
                    entry_ids: Sequence[str]) -> None:
    """XADD each queue's messages (every queue's in one pipeline: one round trip), then XACK `entry_ids` on
    `source`. The acks go only once every XADD succeeded: in one MULTI/EXEC, an XADD that fails at run time (a
    key of the wrong type) would not stop the XACK after it, and the prompt would be acked with no result."""
    client = source.client
    if any(q.client is not client for q, _ in outputs):
        raise ValueError("publish_and_ack: every queue must share one Redis client")
    pipe = client.pipeline(transaction=False)
    for queue, msgs in outputs:
        queue.add_to(pipe, msgs)
    if len(pipe):
        pipe.execute()  # raises the first error, after Redis ran every command: nothing acked yet
    source.ack(entry_ids)

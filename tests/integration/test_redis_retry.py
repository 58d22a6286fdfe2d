"""Clients ride out a Redis restart: a call made while the server is down is retried with backoff and
succeeds once it is back (same port, AOF reloaded: the data is still there); past `retry_s` the call fails."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from services.metrics import free_port
from services.redis_client import connect
from services.redis_server import EmbeddedRedis


def test_a_call_during_a_restart_waits_and_succeeds(tmp_path: Path) -> None:
    # die_with_parent off: the restart runs on a timer thread, and the parent-death signal follows the thread
    server = EmbeddedRedis(port=free_port(), workdir=str(tmp_path / "r"), appendonly=True, die_with_parent=False)
    server.start()
    try:
        client = connect(server.url, 2.0, retry_s=20)
        client.set("orz:k", b"before")
        time.sleep(1.1)  # everysec: the AOF is written before the reply, fsynced within a second
        server.kill()
        threading.Timer(1.5, server.start).start()
        t0 = time.monotonic()
        assert client.get("orz:k") == b"before"  # retried until the server was back, with its AOF
        assert 1.0 <= time.monotonic() - t0 < 10
        no_retry = connect(server.url, 2.0)
        server.kill()
        with pytest.raises(redis.ConnectionError):
            no_retry.get("orz:k")
        short = connect(server.url, 2.0, retry_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            short.get("orz:k")
        assert 0.9 <= time.monotonic() - t0 < 4
    finally:
        server.stop()

"""Shared pytest fixtures. Fixtures that start real servers live here, one per server; keep each one short."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from services.redis_server import EmbeddedRedis, connect


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A fresh, empty redis-server per test (about 0.1 s to start and stop), so tests never share keys."""
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A bytes-returning client of `redis_url`, with the same timeouts every process uses."""
    client = connect(redis_url, socket_timeout_s=5.0)
    yield client
    client.close()

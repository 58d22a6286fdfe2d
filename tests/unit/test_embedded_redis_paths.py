"""An embedded Redis given a relative working directory (what `orz up` passes: runs/<run>/redis) starts, keeps
its AOF there and restarts from it; redis-server changes into --dir before it opens --logfile, so a
relative path once made it exit at once."""

from __future__ import annotations

import os
from pathlib import Path

from services.redis_client import connect
from services.redis_server import EmbeddedRedis


def test_relative_workdir_starts_and_restarts_from_its_aof(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    server = EmbeddedRedis(workdir="runs/x/redis", appendonly=True).start()
    try:
        client = connect(server.url)
        client.set("k", "v")
        client.close()
        assert (tmp_path / "runs/x/redis/redis.log").is_file()
        server.proc.kill()
        server.proc.wait(10)
        server.requested_port = server.port
        server.start()
        client = connect(server.url)
        assert client.get("k") == b"v"  # reloaded from runs/x/redis/appendonlydir
        client.close()
    finally:
        server.stop()
    assert os.path.isdir(tmp_path / "runs/x/redis/appendonlydir")

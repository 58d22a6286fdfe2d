"""Shared pytest fixtures. Fixtures that start real servers live here, one per server; keep each one short."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from services.metrics import free_port, wait_healthy
from services.redis_client import connect
from services.redis_server import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="session")
def tiny_base_model() -> Path:
    """The tiny base model of configs/tiny.yaml, built once (`orz make-base-model`, as `make run` does) when the
    cache does not have it: slow tests start learners and generators that load it."""
    from services.config_io import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", environ={})
    if not (cfg.model.path / "config.json").is_file():
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORZ__")}
        subprocess.run([sys.executable, "-m", "services.cli", "make-base-model", "--config", "configs/tiny.yaml"],
                       cwd=ROOT, env=env, check=True, timeout=1800)
    return cfg.model.path


@pytest.fixture(autouse=True)
def _base_model_for_slow_tests(request: pytest.FixtureRequest) -> None:
    """Every slow test has the tiny base model, whichever runs first on a machine that never built it (a fresh
    CI machine ran the membership test before any `orz up` had built it, and its generators refused to start)."""
    if request.node.get_closest_marker("slow") is not None:
        request.getfixturevalue("tiny_base_model")


@contextmanager
def reward_server_process(*args: str, grader_procs: int = 2,
                          command: tuple[str, ...] = ("-m", "services.cli", "reward-server")) -> Iterator[str]:
    """`orz reward-server` as its own process, exactly as a deployment starts it (its own imports, its own
    sealed grading pool forked from it), on a loopback port; yields its base URL. `command` (after the
    interpreter) may name a script that injects a fault first."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORZ__") and k != "PROMETHEUS_MULTIPROC_DIR"}
    log = tempfile.NamedTemporaryFile("w+", prefix="orz-reward-", suffix=".log")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, *command, "--host", "127.0.0.1",
                             "--port", str(port), "--grader-procs", str(grader_procs), *args], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, 120, proc, "orz reward-server")
        except RuntimeError:
            log.seek(0)
            raise RuntimeError(f"orz reward-server did not start:\n{log.read()[-3000:]}") from None
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.fixture(scope="session")
def reward_server() -> Iterator[str]:
    """One real `orz reward-server` (2 grading processes, default limits) shared by the tests of a session."""
    with reward_server_process() as url:
        yield url

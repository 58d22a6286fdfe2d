"""A throwaway `redis-server` for one machine: `orz up` and the test suite start one when no `redis.url` is set.

It listens on 127.0.0.1 only, on a free port, keeps nothing on disk (`--save ''`, `--appendonly no`, its own
temporary `--dir`), and dies with the process that started it. A shared or durable Redis (AOF on, as a
real deployment needs) is run by the operator and reached through `redis.url` instead. Clients:
services/redis_client.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from typing_extensions import Self


log = logging.getLogger("orz.redis_server")

HOST = "127.0.0.1"
# Debian/Ubuntu install the binary here; a venv or a cron-like environment may not have /usr/bin on PATH.
_FALLBACK_BINARIES = ("/usr/bin/redis-server", "/usr/local/bin/redis-server")
_INSTALL_HINT = (
    "install it with `apt-get install redis-server` (Debian/Ubuntu), "
    "or point `redis.url` at a running Redis instead"
)


class RedisServerError(RuntimeError):
    """The embedded redis-server could not be started (binary missing, crashed at start-up, or never answered)."""


def find_redis_server(binary: str = "redis-server") -> str:
    """Path of the redis-server executable, or a `RedisServerError` that says how to install it."""
    if os.sep in binary:
        if os.path.isfile(binary) and os.access(binary, os.X_OK):
            return binary
        raise RedisServerError(f"redis-server not found at {binary!r}; {_INSTALL_HINT}")
    found = shutil.which(binary)
    if found:
        return found
    if binary == "redis-server":
        for candidate in _FALLBACK_BINARIES:
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    raise RedisServerError(f"{binary!r} not found on PATH; {_INSTALL_HINT}")


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now (another process may still take it before we bind: we retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the parent dies, so a killed test run leaves no server.

    Linux only. The signal follows the *thread* that started the server, so start it from a long-lived one.
    """
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _terminate(proc: subprocess.Popen[bytes], workdir: str | None, timeout_s: float) -> None:
    """SIGTERM, wait, then SIGKILL; then remove the server's directory (unless it is the caller's). Safe to call
    twice."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("redis-server pid %d ignored SIGTERM for %.1fs; killing it", proc.pid, timeout_s)
            proc.kill()
            proc.wait(timeout=timeout_s)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


class EmbeddedRedis:
    """A private `redis-server` subprocess on a free loopback port, for `orz up` and tests.

    Use it as a context manager (`with EmbeddedRedis() as server: connect(server.url)`), or call `start()`
    and `stop()`. `stop()` also runs at garbage collection and interpreter exit, so a forgotten server
    does not outlive the process.
    """

    def __init__(
        self,
        binary: str = "redis-server",
        port: int | None = None,
        startup_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
        extra_args: Sequence[str] = (),
        die_with_parent: bool = True,
        workdir: str | None = None,
        appendonly: bool = False,
        host: str = HOST,
        launcher: Sequence[str] = (),
    ) -> None:
        self.binary = binary
        self.requested_port = port
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.extra_args = tuple(extra_args)
        self.die_with_parent = die_with_parent and sys.platform.startswith("linux")
        # A given `workdir` is kept (a restart with `appendonly` reloads the AOF from it); else a temporary one.
        # Absolute: redis-server changes into --dir before it opens --logfile, so a relative path would break.
        self.keep_dir = os.path.abspath(workdir) if workdir is not None else None
        self.appendonly = appendonly
        # `host`: the address it binds (loopback unless a test gives it a host of its own, a network namespace
        # entered through `launcher`, e.g. `ip netns exec NS`).
        self.host, self.launcher = host, tuple(launcher)
        self.port: int | None = None
        self.workdir: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def url(self) -> str:
        port = self.port if self.port is not None else self.requested_port
        if port is None:
            raise RuntimeError("EmbeddedRedis is not started (and has no fixed port)")
        return f"redis://{self.host}:{port}/0"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Self:
        """Start the server and wait until it answers PING; retries on a port taken between pick and bind."""
        if self.running:
            return self
        binary = find_redis_server(self.binary)
        attempts = 1 if self.requested_port is not None else 5
        last_error = ""
        for _ in range(attempts):
            port = self.requested_port if self.requested_port is not None else free_port()
            error = self._start_once(binary, port)
            if error is None:
                log.info("redis-server pid %d listening on %s", self.pid, self.url)
                return self
            last_error = error
            if "Address already in use" not in error:
                break
        raise RedisServerError(f"redis-server did not start: {last_error}")

    def _start_once(self, binary: str, port: int) -> str | None:
        """One start-up attempt; None on success, else the reason (the server is then fully cleaned up)."""
        if self.keep_dir is not None:
            os.makedirs(self.keep_dir, exist_ok=True)
        workdir = self.keep_dir or tempfile.mkdtemp(prefix="orz-redis-")
        logfile = Path(workdir) / "redis.log"
        args = [
            *self.launcher, binary,
            "--port", str(port),
            "--bind", self.host,
            "--protected-mode", "yes",
            "--save", "",
            *(("--appendonly", "yes", "--appendfsync", "everysec") if self.appendonly else ("--appendonly", "no")),
            "--dir", workdir,
            "--logfile", str(logfile),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                # Its own session: a terminal's Ctrl-C goes to the owner, which stops Redis last, after the
                # processes that use it.
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,  # noqa: PLW1509
            )
        except OSError as exc:
            if self.keep_dir is None:
                shutil.rmtree(workdir, ignore_errors=True)
            raise RedisServerError(f"could not run {binary!r} ({exc}); {_INSTALL_HINT}") from exc
        self.proc, self.port, self.workdir = proc, port, workdir
        self._finalizer = weakref.finalize(self, _terminate, proc, None if self.keep_dir else workdir,
                                           self.stop_timeout_s)

        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if proc.poll() is not None:
                reason = f"exited with code {proc.returncode}: {self._log_tail(logfile)}"
                self.stop()
                return reason
            if self._ping(port):
                return None
            if time.monotonic() > deadline:
                reason = f"no PING reply within {self.startup_timeout_s:.1f}s: {self._log_tail(logfile)}"
                self.stop()
                raise RedisServerError(f"redis-server did not start: {reason}")
            time.sleep(0.01)

    def _ping(self, port: int) -> bool:
        client = redis.Redis(host=self.host, port=port, socket_timeout=0.5, socket_connect_timeout=0.5,
                             retry=Retry(NoBackoff(), 0))
        try:
            return bool(client.ping())
        except redis.AuthenticationError:  # up, and asks for a password (`requirepass` in extra_args)
            return True
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            return False
        finally:
            client.close()

    @staticmethod
    def _log_tail(logfile: Path, lines: int = 8) -> str:
        try:
            tail = logfile.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return " | ".join(tail) or "(empty log)"

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (the fault-injection tests); `start()` brings it back."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.stop()

    def stop(self) -> None:
        """SIGTERM the server, wait, SIGKILL if it lingers, and delete its directory. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()  # runs `_terminate` at most once
        self._finalizer = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

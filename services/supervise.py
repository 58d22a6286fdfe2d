"""`orz up`'s children and their supervision.

A child is one OS process (`orz generator`, `orz reward-server`, `orz learner`, the embedded Redis) with its
log under `runs/<run>/logs/`. With `stack.restart: on-failure` a child that dies is started again with the
same arguments, so a generator keeps its id and takes its old place in the weight-sync group, after a
backoff that doubles from `stack.restart_backoff_s` up to `stack.restart_backoff_max_s`, at most
`stack.max_restarts` times; each restart is one log line and is counted in the run's summary. Training goes
on meanwhile: the queue's leases give a dead generator's prompts to the others, and the generators retry
the reward server and Redis while those are down. With `never`, or once a child has used its restarts, the
run ends with the child's exit code and the tail of its log.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from services.config import StackConfig
from services.redis_server import EmbeddedRedis


class StackError(RuntimeError):
    pass


class Child:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path,
                 launcher: list[str] | None = None) -> None:
        self.name, self.args, self.env, self.launcher = name, args, env, launcher
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("ab")
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*(self.launcher or [sys.executable]), "-m", "services.cli", *self.args],
                                env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def restart(self, args: list[str] | None = None) -> None:
        if args is not None:
            self.args = args
        self.proc = self._spawn()

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class RedisChild:
    """The embedded Redis as a child: restarted on the same port from its append-only file (`everysec`: an
    acknowledged write is in the AOF, so the streams and the queue's pending entries come back)."""

    name = "redis"

    def __init__(self, server: EmbeddedRedis) -> None:
        self.server = server

    def alive(self) -> bool:
        return self.server.running

    @property
    def returncode(self) -> int | None:
        return None if self.server.proc is None else self.server.proc.poll()

    def restart(self) -> None:
        self.server.requested_port = self.server.port
        self.server.start()

    def tail(self, lines: int = 30) -> str:
        log = Path(self.server.workdir or "") / "redis.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else ""


class Supervisor:
    """Restarts dead children by `StackConfig`; `poll` is called from `orz up`'s progress loop."""

    def __init__(self, sc: StackConfig, say: Callable[[str], None], clock: Callable[[], float] = time.monotonic):
        self.sc, self.say, self.clock = sc, say, clock
        self.restarts: dict[str, int] = {}
        self._due: dict[str, float] = {}

    def delay(self, restarts_so_far: int) -> float:
        return min(self.sc.restart_backoff_max_s, self.sc.restart_backoff_s * 2 ** restarts_so_far)

    def poll(self, child: Child | RedisChild, restart: Callable[[], None] | None = None,
             give_up: Callable[[str], str] = lambda msg: msg) -> None:
        """Restarts `child` (with `restart`, default `child.restart`) once its backoff is over; raises StackError
        (its message passed through `give_up`) when it may not be restarted."""
        if child.alive():
            return
        now = self.clock()
        done = self.restarts.get(child.name, 0)
        due = self._due.get(child.name)
        if due is not None:
            if now >= due:
                del self._due[child.name]
                (restart or child.restart)()
                self.restarts[child.name] = done + 1
                self.say(f"restarted {child.name} (restart {done + 1} of at most {self.sc.max_restarts})")
            return
        code = child.returncode
        if self.sc.restart == "never" or done >= self.sc.max_restarts:
            why = "" if self.sc.restart == "never" else f" after {done} restarts (stack.max_restarts)"
            raise StackError(give_up(f"{child.name} exited with code {code}{why}:\n{child.tail()}"))
        wait = self.delay(done)
        self._due[child.name] = now + wait
        self.say(f"{child.name} exited with code {code}; restarting it in {wait:.1f} s")

"""Grading workers have no file or network access: a probe run inside a real worker of the reward server's
pool finds `open`, `socket` and `pipe` refused (EMFILE), while the same probe in an ordinary forked process
succeeds, and the worker still grades."""

from __future__ import annotations

import asyncio
import errno
import multiprocessing
import os
import socket
from pathlib import Path

from prometheus_client import CollectorRegistry

from reward_server.grading import Grader, RewardMetrics
from services.config import RewardConfig


def _probe(path: str) -> dict[str, str]:
    attempts = {
        "open_read": lambda: open("/proc/self/status").close(),  # noqa: SIM115
        "open_write": lambda: open(path, "w").close(),  # noqa: SIM115
        "socket": lambda: socket.create_connection(("127.0.0.1", 9), timeout=0.2).close(),
        "pipe": lambda: [os.close(fd) for fd in os.pipe()],
    }
    out = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            out[name] = "allowed"
        except OSError as exc:
            out[name] = errno.errorcode.get(exc.errno or 0, str(exc))
    return out


def _in_plain_fork(path: str, queue) -> None:
    queue.put(_probe(path))


def test_grading_workers_cannot_open_files_or_sockets(tmp_path: Path) -> None:
    target = str(tmp_path / "written-by-a-grader")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    control = ctx.Process(target=_in_plain_fork, args=(target + "-control", queue))
    control.start()
    unsealed = queue.get(timeout=30)
    control.join(10)
    # the probe does detect access: ECONNREFUSED means the socket was created and the connect was tried
    assert unsealed["open_read"] == unsealed["open_write"] == unsealed["pipe"] == "allowed"
    assert unsealed["socket"] in ("allowed", "ECONNREFUSED")

    async def run() -> tuple[dict[str, str], str]:
        # forked from this test process, which holds torch and vLLM (about 2 GB of address space): a cap with room
        grader = Grader(RewardConfig(grader_procs=1, worker_mem_mb=8192), RewardMetrics(CollectorRegistry()))
        await grader.start()
        try:
            sealed = await asyncio.wrap_future(grader._live_pool().schedule(_probe, args=(target,), timeout=30))
            graded = await grader.grade_one("x", "so <answer>\\boxed{\\frac{1}{2}}</answer>", "0.5", False)
            return sealed, graded.verdict
        finally:
            grader.close()

    sealed, verdict = asyncio.run(run())
    assert sealed == {"open_read": "EMFILE", "open_write": "EMFILE", "socket": "EMFILE", "pipe": "EMFILE"}
    assert not os.path.exists(target)
    assert verdict == "correct"  # and it still grades, through the pipes it had before the seal

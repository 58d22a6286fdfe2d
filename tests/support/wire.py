"""A network link with delay and loss, in user space: `tc netem` for kernels without it (this machine's has
no sch_netem and no tc actions).

    python wire.py OUTER INNER CONTROL_JSON

Creates two TAP devices, OUTER and INNER, and forwards every Ethernet frame between them: each is dropped
with probability `loss`, else delivered after `delay_ms` ± `jitter_ms` (uniform), in order per direction
(netem with jitter may reorder; TCP copes either way). The harness attaches OUTER to the bridge and moves
INNER into the host's namespace as its eth0. The settings come from CONTROL_JSON, read again whenever it
changes: {"delay_ms": 200, "jitter_ms": 100, "loss": 0.05}. Counts (frames forwarded and dropped) are
written to CONTROL_JSON + ".stats" once a second. Prints "ready" once both devices exist.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import select
import struct
import sys
import time
from collections import deque
from pathlib import Path

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def main() -> None:
    outer, inner, control = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    fds = {open_tap(outer): None, open_tap(inner): None}
    a, b = list(fds)
    peer = {a: b, b: a}
    queues: dict[int, deque] = {a: deque(), b: deque()}  # frames to write to this fd: (due, frame)
    settings = {"delay_ms": 0.0, "jitter_ms": 0.0, "loss": 0.0}
    mtime = 0.0
    rng = random.Random(0)
    stats = {"forwarded": 0, "dropped": 0}
    last_stats = 0.0
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        try:
            m = control.stat().st_mtime
            if m != mtime:
                mtime, settings = m, {**settings, **json.loads(control.read_text() or "{}")}
        except (OSError, ValueError):
            pass
        if now - last_stats > 1.0:
            Path(f"{control}.stats").write_text(json.dumps({**stats, **settings}))
            last_stats = now
        heads = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(heads) - now) if heads else 0.2
        readable, _, _ = select.select([a, b], [], [], min(timeout, 0.2))
        now = time.monotonic()
        for fd in readable:
            for _ in range(64):
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:  # the device is down (a partition): nothing to read
                    break
                if rng.random() < settings["loss"]:
                    stats["dropped"] += 1
                    continue
                delay = (settings["delay_ms"] + rng.uniform(-1, 1) * settings["jitter_ms"]) / 1000
                q = queues[peer[fd]]
                due = max(now + max(0.0, delay), q[-1][0] if q else 0.0)
                q.append((due, frame))
        for fd, q in queues.items():
            while q and q[0][0] <= now:
                _, frame = q.popleft()
                try:
                    os.write(fd, frame)
                    stats["forwarded"] += 1
                except OSError:  # the device is down: the frame is lost, as on a cut cable
                    stats["dropped"] += 1


if __name__ == "__main__":
    main()

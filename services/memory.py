"""Giving freed heap memory back to the OS (glibc `malloc_trim`), for processes that run for days.

The learner and the generators allocate and free tensors of many sizes from several threads (gloo, Redis,
heartbeats); glibc keeps what they free in per-thread arenas instead of returning it, so their resident
memory creeps up long after the working set is steady. In the soak (bench/soak.py) one `malloc_trim(0)`
gave back 70 MB of a 655 MB learner and 19 MB of a 749 MB generator. Between trims RSS still holds the
freed peak of the last steps (tens of MB for the tiny learner), so they trim every 10 s; a trim costs a few
milliseconds (no change in the soak's step rate). Elsewhere than glibc (musl, macOS) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time

log = logging.getLogger(__name__)

TRIM_EVERY_S = 10.0


def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


# glibc's mallopt parameters: keep message-sized blocks (a TrajectoryGroup is ~1 MB) on the heap and freed heap
# memory mapped, so the next message reuses pages instead of faulting fresh ones in (bench/transport.py: the
# queue path 0.54× → 0.70× of raw on a 2-core VM, where first-touching memory runs at ~0.6 GB/s). The periodic
# `malloc_trim` above still gives the freed peak back.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest; bigger blocks are still mmapped
TRIM_THRESHOLD = 512 * 2**20


def keep_freed_memory() -> bool:
    """Tunes glibc's allocator for a process that moves messages (learner, generators); False where it is not
    glibc. Call once, at start."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


class HeapTrimmer:
    """`maybe()` in a process's main loop: trims at most once per `every_s` seconds."""

    def __init__(self, every_s: float = TRIM_EVERY_S) -> None:
        self.every_s = every_s
        self._trim = _malloc_trim()
        self._last = time.monotonic()
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def trim(self) -> bool:
        """Trim now; True if the allocator gave memory back."""
        self._last = time.monotonic()
        if self._trim is None:
            return False
        self.trims += 1
        return bool(self._trim(0))

    def maybe(self) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self.trim()


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_mb() -> float:
    """This process's resident memory now (Linux)."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> None:
    """Starts a new peak: the kernel's high-water mark of resident memory (VmHWM) is set to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    """The highest resident memory since the process started or `reset_peak_rss()` (Linux).

    Freed tensors count only once glibc has returned them: measure with `MALLOC_MMAP_THRESHOLD_` fixed (say
    65536), so that every large allocation is its own mapping, given back when freed, and RSS follows what
    is live. glibc otherwise raises the threshold after the first free and keeps freed tensors in its heap."""
    return _status_mb("VmHWM")

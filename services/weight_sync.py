"""Learner → generator weight broadcast over a torch.distributed process group (gloo on CPU, NCCL on GPU).

The group is built directly from a `TCPStore` (a "stateless" group, as vLLM's and OpenRLHF's weight-sync
groups are), not through `init_process_group`, so the learner's own default group stays free for data
parallelism. The learner is rank 0 and hosts the store; generators take ranks 1..N.

Parameters are flattened into buckets of at most `bucket_bytes` (one collective per bucket, never one per
parameter — per-parameter calls are a known cause of slow syncs in peers' weight updates). Each
broadcast is preceded by a small header `[version, n_buckets]`; version −1 tells receivers to stop, −2 to
leave this group and join the next one announced (the membership changed: services/membership.py), −3 that
the learner times each member's link with a point-to-point round trip (`WeightSender.probe`).
The layout (names, shapes, dtype, bucket size) travels once, in the `WeightsAnnouncement` kept in Redis.

Buffers are allocated once and reused: a fresh multi-hundred-MB host buffer per bucket costs its page faults
on every sync, which measured 4× slower than the transfer itself (bench/weight_sync.py). The sender
stages buckets through two buffers, packing the next while the previous one is on the wire (a bucket of one
contiguous tensor, such as an embedding, goes out as it lies); with gloo, `transport_threads` devices carry
consecutive buckets on different threads and connections, so two are on the wire at once. The receiver
keeps one flat buffer per bucket and hands out views into them, valid until its next `receive()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from datetime import timedelta

import torch
import torch.distributed as dist

from services.protocol import WeightsAnnouncement

log = logging.getLogger("orz.weight_sync")

STOP_VERSION = -1  # header version: the learner closes the group for good
REFORM_VERSION = -2  # header version: membership changed; join the group of the next announcement
PROBE_VERSION = -3  # header version: echo the probe buffer back to rank 0 (header[1]: its elements)
PROBE_TAG = 7
MAX_PROBE_ELEMS = 2**24  # a receiver refuses a probe header asking for more (64 MB)


def layout_digest(names: Iterable[str], shapes: Iterable[tuple[int, ...]]) -> str:
    """A short fingerprint of a model's parameter names and shapes. Generators put theirs in the heartbeat and
    the learner forms weight-sync groups only with those whose layout is its own: the rendezvous has no
    authentication, so this is what stops a generator serving another model from joining and receiving
    tensors it would load into the wrong places."""
    text = json.dumps(sorted([n, list(s)] for n, s in zip(names, shapes, strict=True)))
    return hashlib.sha256(text.encode()).hexdigest()


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def bucket_layout(shapes: Iterable[tuple[int, ...]], elem_bytes: int, bucket_bytes: int) -> list[list[int]]:
    """Indices of the tensors in each bucket, in order; a tensor larger than a bucket gets one of its own."""
    buckets: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, shape in enumerate(shapes):
        size = elem_bytes
        for d in shape:
            size *= d
        if current and used + size > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    if current:
        buckets.append(current)
    return buckets


def make_group(backend: str, rendezvous: str, rank: int, world_size: int, timeout_s: float,
               session: str, threads: int = 1) -> dist.ProcessGroup:
    """Join (rank > 0) or host (rank 0) the weight-sync group at `tcp://host:port`. gloo: `threads` devices,
    each with its own transport thread and connections; torch spreads consecutive collectives over them."""
    if not rendezvous.startswith("tcp://"):
        raise ValueError(f"rendezvous must be tcp://host:port, got {rendezvous!r}")
    host, port = rendezvous[len("tcp://"):].rsplit(":", 1)
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, int(port), world_size, is_master=(rank == 0), timeout=timeout,
                          wait_for_workers=False)
    store = dist.PrefixStore(f"orz-weights/{session}", store)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [gloo_device(host, int(port)) for _ in range(threads)]
        return dist.ProcessGroupGloo(store, rank, world_size, opts)
    if backend == "nccl":  # pragma: no cover - needs GPUs
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    raise ValueError(f"unknown weight-sync backend {backend!r}")


def local_address(host: str, port: int) -> str:
    """The address of this machine's interface on the route to host:port (a UDP connect picks the route and
    sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


def gloo_device(host: str, port: int) -> dist.ProcessGroupGloo.Device:
    """Gloo's transport device: the interface named by GLOO_SOCKET_IFNAME when set, else the one on the route
    to the rendezvous host. Gloo's own default is the address the machine's hostname resolves to, which is
    127.0.0.1 (or 127.0.1.1) on many hosts and containers: peers on other machines were then told to dial
    loopback, and the group never formed (found by tests/multihost)."""
    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    if ifname:
        return dist.ProcessGroupGloo.create_device(interface=ifname.split(",")[0])
    return dist.ProcessGroupGloo.create_device(hostname=local_address(host, port))


# How long a receiver waits for the *next* version. Between versions the learner is training or waiting for
# trajectories, for minutes per step on real models, so this wait cannot use the group's timeout (a receiver
# would leave after every long step and the learner's next broadcast would fail). A dead learner closes the
# connection and ends the wait at once; past this the receiver gives up the group and awaits the next one.
NEXT_VERSION_WAIT_S = 6 * 3600.0
SUPERSEDED_POLL_S = 1.0  # how often a waiting receiver checks for a newer group (one small Redis GET)
HEADER_POLL_S = 0.02  # how often it looks whether the header arrived (16 generator threads a process in the sim)


def _broadcast(group: dist.ProcessGroup, tensor: torch.Tensor, wait: bool = True, timeout_s: float | None = None):
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    if timeout_s is not None:  # this collective only; the others keep the group's timeout
        opts.timeout = timedelta(seconds=timeout_s)
    work = group.broadcast([tensor], opts)
    if wait:
        work.wait()
    return work


class WeightSender:
    """Rank 0 (the learner): hosts the group and broadcasts a named-parameter dict per new version."""

    def __init__(self, announcement: WeightsAnnouncement, timeout_s: float) -> None:
        self.ann = announcement
        self.dtype = getattr(torch, announcement.dtype)
        elem = torch.empty((), dtype=self.dtype).element_size()
        self.buckets = bucket_layout(announcement.shapes, elem, announcement.bucket_bytes)
        self.device = torch.device("cuda" if announcement.backend == "nccl" else "cpu")
        self.group: dist.ProcessGroup | None = None
        self.timeout_s = timeout_s
        self._sizes = [[_numel(announcement.shapes[i]) for i in idx] for idx in self.buckets]
        self._staging: list[torch.Tensor] = []  # two buffers of the largest bucket, allocated on first send

    def connect(self) -> float:
        """Blocks until every generator rank has joined; returns the seconds it waited."""
        t0 = time.time()
        self.group = make_group(self.ann.backend, self.ann.rendezvous, 0, self.ann.world_size,
                                self.timeout_s, self.ann.session, self.ann.transport_threads)
        return time.time() - t0

    def send(self, version: int, params: dict[str, torch.Tensor]) -> float:
        assert self.group is not None, "connect() first"
        t0 = time.time()
        if not self._staging:
            self._staging = [torch.empty(0, dtype=self.dtype, device=self.device) for _ in range(2)]
        header = torch.tensor([version, len(self.buckets)], dtype=torch.int64, device=self.device)
        _broadcast(self.group, header)
        works: list = [None, None]
        with torch.no_grad():
            for b, (idx, sizes) in enumerate(zip(self.buckets, self._sizes)):
                slot = b % 2
                if works[slot] is not None:
                    works[slot].wait()  # that buffer's previous bucket has left
                whole = params[self.ann.names[idx[0]]].detach() if len(idx) == 1 else None
                if whole is not None and whole.is_contiguous() and whole.dtype == self.dtype and \
                        whole.device.type == self.device.type:
                    flat = whole.view(-1)  # a bucket of one tensor goes out as it lies: no copy (an embedding)
                else:
                    if self._staging[slot].numel() < sum(sizes):  # sized by the largest bucket that needs one
                        self._staging[slot] = torch.empty(sum(sizes), dtype=self.dtype, device=self.device)
                    flat = self._staging[slot][: sum(sizes)]
                    for i, chunk in zip(idx, torch.split(flat, sizes)):
                        chunk.copy_(params[self.ann.names[i]].detach().reshape(-1))
                works[slot] = _broadcast(self.group, flat, wait=False)
            for work in works:
                if work is not None:
                    work.wait()
        return time.time() - t0

    def probe(self, nbytes: int) -> dict[int, float]:
        """Seconds of a `nbytes` round trip (rank 0 → member → rank 0) to each member in turn, by rank.

        A broadcast is as slow as its slowest member, and its time alone does not say which member that is
        (every member's buckets are paced by the slowest); one member at a time, each link is timed alone.
        Every collective keeps the group's timeout, so a member that does not answer raises like a failed
        broadcast."""
        assert self.group is not None, "connect() first"
        elems = max(1, nbytes // 4)
        _broadcast(self.group, torch.tensor([PROBE_VERSION, elems], dtype=torch.int64, device=self.device))
        buf = torch.zeros(elems, dtype=torch.float32, device=self.device)
        out: dict[int, float] = {}
        for rank in range(1, self.ann.world_size):
            t0 = time.perf_counter()
            self.group.send([buf], rank, PROBE_TAG).wait()
            self.group.recv([buf], rank, PROBE_TAG).wait()
            out[rank] = time.perf_counter() - t0
        return out

    def stop(self, version: int = STOP_VERSION) -> None:
        """Closes the group; receivers see `version` (STOP_VERSION: for good; REFORM_VERSION: a new group
        follows). Best effort: a receiver may already be gone."""
        if self.group is None:
            return
        try:
            _broadcast(self.group, torch.tensor([version, 0], dtype=torch.int64, device=self.device))
        except Exception as exc:  # receivers may already be gone; stopping must not fail the learner
            log.warning("weight-sync stop broadcast failed: %s", exc)
        self.group = None


class GroupSuperseded(RuntimeError):
    """The learner announced a newer group while this receiver waited in the old one."""


class WeightReceiver:
    """Ranks 1..N (generators): receive one version at a time as a list of (HF name, tensor)."""

    def __init__(self, announcement: WeightsAnnouncement, rank: int, timeout_s: float,
                 next_version_wait_s: float = NEXT_VERSION_WAIT_S) -> None:
        if not 1 <= rank < announcement.world_size:
            raise ValueError(f"rank {rank} outside the weight-sync group of size {announcement.world_size}")
        self.ann = announcement
        self.rank = rank
        self.dtype = getattr(torch, announcement.dtype)
        elem = torch.empty((), dtype=self.dtype).element_size()
        self.buckets = bucket_layout(announcement.shapes, elem, announcement.bucket_bytes)
        self.device = torch.device("cuda" if announcement.backend == "nccl" else "cpu")
        self.group = make_group(announcement.backend, announcement.rendezvous, rank, announcement.world_size,
                                timeout_s, announcement.session, announcement.transport_threads)
        self._sizes = [[_numel(announcement.shapes[i]) for i in idx] for idx in self.buckets]
        self._flat: list[torch.Tensor] = []  # one buffer per bucket, allocated on the first version
        self.next_version_wait_s = max(next_version_wait_s, timeout_s)

    def receive(self, superseded: Callable[[], bool] | None = None) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        """Blocks for the next broadcast (up to `next_version_wait_s`; the buckets that follow its header within
        the group's timeout); returns (version, weights), or (STOP_VERSION or REFORM_VERSION, []), or
        (PROBE_VERSION, []) once it has echoed the learner's probe.

        While it waits for the header, `superseded()` is asked every second: when it is true (the learner has
        announced a newer group with this generator in it) the wait ends with GroupSuperseded. A learner that
        dies closes its connections and ends the wait by itself; one cut off by the network does not (its
        FIN never arrives), and without this the generator waited in the old group for `next_version_wait_s`
        while the restarted learner's new group timed out without it (found by tests/multihost).

        The weights are views into this receiver's buffers: load (copy) them before calling again."""
        header = torch.zeros(2, dtype=torch.int64, device=self.device)
        work = _broadcast(self.group, header, wait=False, timeout_s=self.next_version_wait_s)  # learner mid-step
        asked = time.monotonic()
        while superseded is not None and not work.is_completed():
            if time.monotonic() - asked >= SUPERSEDED_POLL_S:
                asked = time.monotonic()
                if superseded():
                    with contextlib.suppress(Exception):  # frees the pending wait where gloo supports it
                        self.group.abort()
                    raise GroupSuperseded(f"a newer weight-sync group replaced {self.ann.session[:8]}")
            time.sleep(HEADER_POLL_S)
        work.wait()
        version, n_buckets = int(header[0]), int(header[1])
        if version in (STOP_VERSION, REFORM_VERSION):
            return version, []
        if version == PROBE_VERSION:
            if not 0 < n_buckets <= MAX_PROBE_ELEMS:
                raise RuntimeError(f"probe of {n_buckets} elements is outside 1..{MAX_PROBE_ELEMS}")
            buf = torch.empty(n_buckets, dtype=torch.float32, device=self.device)
            self.group.recv([buf], 0, PROBE_TAG).wait()
            self.group.send([buf], 0, PROBE_TAG).wait()
            return version, []
        if n_buckets != len(self.buckets):
            raise RuntimeError(f"sender uses {n_buckets} buckets, this layout has {len(self.buckets)}")
        if not self._flat:
            self._flat = [torch.empty(sum(sizes), dtype=self.dtype, device=self.device) for sizes in self._sizes]
        out: list[tuple[str, torch.Tensor]] = []
        works = [_broadcast(self.group, flat, wait=False) for flat in self._flat]  # posted in order
        for idx, sizes, flat, work in zip(self.buckets, self._sizes, self._flat, works):
            work.wait()
            for i, chunk in zip(idx, torch.split(flat, sizes)):
                out.append((self.ann.names[i], chunk.view(self.ann.shapes[i])))
        return version, out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

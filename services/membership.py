"""Weight-sync membership, both halves side by side: the learner's `WeightGroup` (the leader) and each
generator's `WeightListener` (a member) (docs/architecture.md, "Weight sync").

Generators register by heartbeat in the hash `{ns}:generators`. Whenever the set of live generators differs
from the members of the current group — one joined, one left or died, one stopped heartbeating — the learner
forms a new group for exactly the live ones: it tells the old members to leave (header REFORM_VERSION),
publishes a `WeightsAnnouncement` with a fresh session, port and member list (member i joins as rank i + 1),
waits for them to join, and sends the current weights at once, so a generator that joined late (or after a
learner resume) is current before it samples. A broadcast that fails (a member died mid-transfer: gloo
reports the closed connection, or a hung one is cut off by the `weight_sync.timeout_s` collective timeout)
closes the group; the next `sync` forms one for the generators that heartbeat after the failure, so the
learner and the other members carry on within about one heartbeat period. A member that never joins makes
formation time out (`weight_sync.timeout_s`); the learner goes on training with the trajectories it has,
and forms the next group from the generators that heartbeat after that.

One slow link must not hold back every step: a broadcast is as slow as its slowest member, and the learner
waits for it. A broadcast slower than `weight_sync.slow_broadcast_s` makes the learner time each member's
link alone (`WeightSender.probe`); a member over `slow_peer_factor` times the fastest is left out of weight
sync for `slow_peer_cooldown_s` (doubling each time it is, up to 8×). Left out, its weights fall behind, it
stops taking prompts once they are more than `learner.max_staleness` behind (generator/worker.py), and after
the cooldown it is asked in again.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import redis
import torch

from services.config import Config
from services.control import ControlPlane
from services.metrics import free_port
from services.protocol import ProtocolError, WeightsAnnouncement
from services.weight_sync import (
    PROBE_VERSION,
    REFORM_VERSION,
    STOP_VERSION,
    WeightReceiver,
    WeightSender,
    layout_digest,
    resolve_backend,
)

log = logging.getLogger("orz.membership")

PROBE_BYTES = 64 * 1024  # each member's link is timed with a round trip of this size
SLOW_PEER_MIN_S = 0.1  # a round trip under this is never slow, however it compares (jitter on fast links)


class WeightGroup:
    """The learner's side: forms groups of the live generators, broadcasts each new version, leaves slow
    members out."""

    def __init__(self, cfg: Config, control: ControlPlane, names: tuple[str, ...],
                 shapes: tuple[tuple[int, ...], ...], retry_s: float = 10.0,
                 on_slow: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.control = control
        self.names, self.shapes = names, shapes
        self.layout = layout_digest(names, shapes)
        self.refused: set[str] = set()  # generators left out for serving another model
        self.retry_s = retry_s
        self.members: tuple[str, ...] = ()
        self.sender: WeightSender | None = None
        self.announcement: WeightsAnnouncement | None = None  # of the current group
        self.sent_version = -1
        self.formations = 0
        self._attempt = 0  # groups tried so far (formed or not)
        self._failed: tuple[tuple[str, ...], float] | None = None  # members that did not join, and when
        # When the last broadcast (or formation) failed: only generators that heartbeat after it are asked into a
        # group. The dead member's heartbeat stays fresh for up to 3 periods; asking it in would make formation
        # wait the whole `weight_sync.timeout_s` for a process that is gone. Live generators beat every period.
        self._broken_at: float | None = None
        self.left_out: dict[str, float] = {}  # slow members, and until when they stay out of weight sync
        self._slow_count: Counter[str] = Counter()
        self.on_slow = on_slow

    def live(self) -> tuple[str, ...]:
        """Generators whose heartbeat is fresher than 3 heartbeat periods and whose model layout (names and
        shapes) is the learner's, sorted by id."""
        stale_after = 3 * self.cfg.generator.heartbeat_s
        now = time.time()
        live = []
        for gid, beat in self.control.heartbeats().items():
            fresh = now - beat.ts <= stale_after
            if self._broken_at is not None and beat.ts <= self._broken_at:
                continue  # not heard from since a broadcast failed: the member that broke it, until it beats again
            if self.left_out.get(gid, 0.0) > now:
                continue  # a slow link, left out until its cooldown ends
            layout = beat.layout
            if fresh and layout is not None and layout != self.layout:
                if gid not in self.refused:
                    log.error("generator %s serves a model of another layout (%s, the learner's is %s): not "
                              "admitted to weight sync", gid, str(layout)[:12], self.layout[:12])
                self.refused.add(gid)
                continue
            if fresh:
                live.append(gid)
        return tuple(sorted(live))

    def sync(self, version: int, state: dict[str, torch.Tensor]) -> float | None:
        """Re-forms the group if the live generators changed, and sends `version` unless this group already has
        it. Returns the broadcast seconds, or None when nothing was sent."""
        live = self.live()
        if live != self.members or (self.sender is None and live):
            if self._failed is not None and self._failed[0] == live and time.time() - self._failed[1] < self.retry_s:
                return None  # the same set just failed to join; wait for heartbeats to change
            if self.members and live != self.members:
                left, joined = set(self.members) - set(live), set(live) - set(self.members)
                log.info("weight-sync membership changed (left: %s; joined: %s): re-forming the group",
                         ", ".join(sorted(left)) or "-", ", ".join(sorted(joined)) or "-")
            self._form(live)
        if self.sender is None or version == self.sent_version:
            return None
        try:
            seconds = self.sender.send(version, state)
        except Exception as exc:  # a member died mid-broadcast
            log.warning("weight broadcast of v%d failed (%s); re-forming the group with the generators that "
                        "heartbeat from now on", version, exc)
            self._close()
            self._broken_at = time.time()
            return None
        self.sent_version = version
        ws = self.cfg.weight_sync
        if ws.slow_broadcast_s and seconds > ws.slow_broadcast_s and len(self.members) > 1:
            self._leave_out_slow(version, seconds)
        return seconds

    def _leave_out_slow(self, version: int, seconds: float) -> None:
        """Times each member's link; leaves out of weight sync those much slower than the fastest."""
        ws = self.cfg.weight_sync
        try:
            by_rank = self.sender.probe(PROBE_BYTES)
        except Exception as exc:  # a member died or hung mid-probe: as a failed broadcast
            log.warning("weight-sync probe after v%d failed (%s); re-forming the group", version, exc)
            self._close()
            self._broken_at = time.time()
            return
        rtt = {self.members[rank - 1]: t for rank, t in by_rank.items()}
        fastest = min(rtt.values())
        slow = [g for g, t in rtt.items() if t > ws.slow_peer_factor * fastest and t > SLOW_PEER_MIN_S]
        log.info("broadcast of v%d took %.1f s; link round trips (%d KiB): %s", version, seconds,
                 PROBE_BYTES // 1024, ", ".join(f"{g} {t * 1000:.0f} ms" for g, t in sorted(rtt.items())))
        for gid in slow:
            self._slow_count[gid] += 1
            cooldown = ws.slow_peer_cooldown_s * 2 ** min(self._slow_count[gid] - 1, 3)
            self.left_out[gid] = time.time() + cooldown
            log.warning("generator %s has a slow weight-sync link (%.0f ms round trip, the fastest member %.0f ms): "
                        "left out of weight sync for %.0f s", gid, rtt[gid] * 1000, fastest * 1000, cooldown)
            if self.on_slow is not None:
                self.on_slow(gid)

    def _form(self, live: tuple[str, ...]) -> None:
        self._close()
        if not live:
            return
        ws = self.cfg.weight_sync
        # A new group never reuses the previous group's port: a generator re-joining at once could reach the
        # old store while it shuts down. A fixed `port` (firewalls, Kubernetes) cycles through a range.
        self._attempt += 1
        port = ws.port + self._attempt % ws.port_span if ws.port else free_port(ws.host)
        ann = WeightsAnnouncement(
            rendezvous=f"tcp://{ws.host}:{port}", world_size=1 + len(live), backend=resolve_backend(ws.backend),
            names=self.names, shapes=self.shapes, dtype="float32", bucket_bytes=ws.bucket_mb * 2**20,
            session=uuid.uuid4().hex, members=live, transport_threads=ws.gloo_threads,
        )
        sender = WeightSender(ann, ws.timeout_s)
        self.control.announce(ann)
        t0 = time.time()
        try:
            sender.connect()
        except Exception as exc:
            log.warning("weight-sync group of %s not formed in %.0f s (%s); will retry", list(live),
                        time.time() - t0, exc)
            self._failed = (live, time.time())
            self._broken_at = time.time()
            self.control.withdraw_announcement()
            return
        self.sender, self.members, self.sent_version, self.announcement = sender, live, -1, ann
        self._failed = None
        self.formations += 1
        log.info("weight-sync group %d formed at %s with %d generator(s) %s in %.2f s", self.formations,
                 ann.rendezvous, len(live), list(live), time.time() - t0)

    def republish(self) -> None:
        """Writes the current group's announcement again (Redis restarted and may have lost it)."""
        if self.sender is not None and self.announcement is not None:
            self.control.announce(self.announcement)

    def _close(self) -> None:
        """Leaves the current group; its members (if still listening) go and wait for the next announcement."""
        if self.sender is not None:
            self.sender.stop(REFORM_VERSION)
        self.sender, self.members, self.sent_version = None, (), -1

    def stop(self, for_good: bool = True) -> None:
        """Closes the group: for good (generators stop listening), or, when this learner is going away to be
        resumed (it lost Redis), with a re-form header so generators wait for the next learner's group."""
        if self.sender is not None:
            self.sender.stop() if for_good else self.sender.stop(REFORM_VERSION)
        self.sender, self.members = None, ()


class WeightListener(threading.Thread):
    """A generator's side: member of the learner's weight-sync group (`WeightGroup`); keeps the newest
    received version for the main loop to load between engine steps.

    Waits for an announcement that lists this generator, joins as the rank it was given, and receives
    versions until the learner closes the group: REFORM_VERSION (membership changed) or a broken connection
    (the learner re-forms after a failed broadcast, or restarted) send it back to wait for the next
    announcement; STOP_VERSION ends it. The learner only lists generators with a fresh heartbeat.
    """

    def __init__(self, cfg: Config, control: ControlPlane, generator_id: str, stop: threading.Event,
                 layout: str | None = None) -> None:
        super().__init__(name="weight-listener", daemon=True)
        self.cfg, self.control, self.generator_id, self.stop_event = cfg, control, generator_id, stop
        self.layout = layout  # digest of the served model's names and shapes (None: not checked)
        self._lock = threading.Lock()
        self._pending: tuple[int, list] | None = None
        self._released = threading.Event()  # the main loop is done with the last version handed over
        self._released.set()
        self.error: BaseException | None = None
        self.rank: int | None = None
        self.joined = 0  # groups joined so far
        self.stopped = False  # the learner closed weight sync for good

    def take(self) -> tuple[int, list] | None:
        """The newest received version not yet taken; call `release()` once its tensors are loaded."""
        with self._lock:
            pending, self._pending = self._pending, None
            return pending

    def release(self) -> None:
        """The weights last taken are loaded: the receiver may reuse its buffers for the next version."""
        self._released.set()

    def _announcement(self, after_session: str | None) -> WeightsAnnouncement | None:
        """The first announcement listing this generator whose session is not `after_session`."""
        while not self.stop_event.is_set():
            try:
                ann = self.control.announcement()
            except ProtocolError as exc:
                raise RuntimeError(f"unreadable weight-sync announcement: {exc}") from None
            if ann is not None:
                theirs = layout_digest(ann.names, ann.shapes)
                if self.layout is not None and theirs != self.layout:
                    raise RuntimeError(
                        f"the learner broadcasts a model of another architecture ({len(ann.names)} tensors, layout "
                        f"{theirs[:12]}) than this generator serves ({self.cfg.model.path}, layout "
                        f"{self.layout[:12]}): check model.base_path on both")
                if ann.session != after_session and self.generator_id in ann.members:
                    return ann
            self.stop_event.wait(0.2)
        return None

    def _newer_group(self, session: str) -> bool:
        """The learner has announced another group that lists this generator (it re-formed or restarted)."""
        try:
            ann = self.control.announcement()
        except (ProtocolError, redis.RedisError):  # unreadable, or Redis away: stay in the group
            return False
        return ann is not None and ann.session != session and self.generator_id in ann.members

    def run(self) -> None:
        session: str | None = None
        try:
            while not self.stop_event.is_set():
                ann = self._announcement(session)
                if ann is None:
                    return
                session = ann.session
                self.rank = ann.members.index(self.generator_id) + 1
                try:
                    receiver = WeightReceiver(ann, self.rank, self.cfg.weight_sync.timeout_s)
                except Exception as exc:  # the learner gave up on this group before we arrived
                    log.warning("could not join weight-sync group %s: %s", ann.session[:8], exc)
                    continue
                self.joined += 1
                log.info("joined weight-sync group %s as rank %d/%d", ann.session[:8], self.rank, ann.world_size)
                while not self.stop_event.is_set():
                    # The received tensors are views into the receiver's reusable buffers: the next version
                    # is received only once the main loop has loaded this one (between two engine steps).
                    while not self._released.wait(0.1):
                        if self.stop_event.is_set():
                            return
                    try:
                        version, weights = receiver.receive(lambda s=session: self._newer_group(s))
                    except Exception as exc:
                        log.warning("weight-sync group %s closed (%s); waiting for the next one", ann.session[:8],
                                    exc)
                        break
                    if version == STOP_VERSION:
                        log.info("learner closed the weight-sync group")
                        self.stopped = True
                        return
                    if version == REFORM_VERSION:
                        log.info("weight-sync membership changed; re-joining")
                        break
                    if version == PROBE_VERSION:  # the learner timed this link; nothing to load
                        continue
                    with self._lock:
                        self._released.clear()
                        self._pending = (version, weights)
        except BaseException as exc:  # surfaced to the main loop, which decides to exit
            if not self.stop_event.is_set():
                self.error = exc
                log.exception("weight listener failed")

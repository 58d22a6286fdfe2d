"""The weight-sync group for real: a learner rank and two generator ranks in separate processes, gloo."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.metrics import free_port
from services.protocol import WeightsAnnouncement
from services.weight_sync import PROBE_VERSION, STOP_VERSION, WeightReceiver, WeightSender, bucket_layout


def _params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(50, 8, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g),
        "model.norm.weight": torch.randn(8, generator=g),
        "lm_head.weight": torch.randn(50, 8, generator=g),
    }


def _announcement(bucket_bytes: int) -> WeightsAnnouncement:
    p = _params(0)
    return WeightsAnnouncement(
        rendezvous=f"tcp://127.0.0.1:{free_port()}", world_size=3, backend="gloo", names=tuple(p),
        shapes=tuple(tuple(t.shape) for t in p.values()), dtype="float32", bucket_bytes=bucket_bytes,
        session=uuid.uuid4().hex,
    )


def _receiver(raw: bytes, rank: int, out_dir: str) -> None:
    ann = WeightsAnnouncement.from_bytes(raw)
    receiver = WeightReceiver(ann, rank, timeout_s=60)
    while True:
        version, weights = receiver.receive()
        if version == STOP_VERSION:
            break
        if version == PROBE_VERSION:  # echoed the learner's round trip; nothing to save
            Path(f"{out_dir}/rank{rank}-probed").touch()
            continue
        # Results go back through files (safetensors), not pickled queues.
        save_file({n: t.contiguous() for n, t in weights}, f"{out_dir}/rank{rank}-v{version}.safetensors")


def test_bucket_layout_packs_in_order_and_isolates_big_tensors() -> None:
    # 4-byte elements, 100-byte buckets: 10+10 elements fit (80 B); 30 elements (120 B) get their own bucket.
    assert bucket_layout([(10,), (10,), (30,), (5,), (2, 2)], 4, 100) == [[0, 1], [2], [3, 4]]
    assert bucket_layout([(1,)] * 3, 4, 4) == [[0], [1], [2]]


@pytest.mark.parametrize("bucket_bytes", [256 * 2**20, 700])
def test_broadcast_reaches_every_generator_rank(bucket_bytes: int, tmp_path: Path) -> None:
    ann = _announcement(bucket_bytes)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_receiver, args=(ann.to_bytes(), r, str(tmp_path))) for r in (1, 2)]
    for p in procs:
        p.start()
    sender = WeightSender(ann, timeout_s=60)
    sender.connect()
    sent = {1: _params(1), 2: _params(2)}
    for version, params in sent.items():
        sender.send(version, params)
        if version == 1:  # a link probe between two versions: each member echoes it, then v2 arrives intact
            rtt = sender.probe(64 * 1024)
            assert sorted(rtt) == [1, 2] and all(0 < t < 10 for t in rtt.values()), rtt
    sender.stop()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    # 256 MiB holds everything in one bucket; 700 bytes forces one collective per bucket, several buckets.
    assert len(sender.buckets) == (1 if bucket_bytes > 10_000 else 3)
    for rank in (1, 2):
        files = sorted(f.name for f in tmp_path.glob(f"rank{rank}-*"))
        assert files == [f"rank{rank}-probed", f"rank{rank}-v1.safetensors", f"rank{rank}-v2.safetensors"]
        for version in (1, 2):
            weights = load_file(str(tmp_path / f"rank{rank}-v{version}.safetensors"))
            assert set(weights) == set(sent[version])
            for name, tensor in weights.items():
                torch.testing.assert_close(tensor, sent[version][name], rtol=0, atol=0)


def _slow_receiver(raw: bytes, out_dir: str, ready, go) -> None:  # noqa: ANN001 (multiprocessing events)
    ann = WeightsAnnouncement.from_bytes(raw)
    ready.set()  # imports done (torch takes seconds on a loaded machine): the timed part may start
    go.wait(60)
    receiver = WeightReceiver(ann, 1, timeout_s=1.0)  # the group's timeout: 1 s
    t0 = time.time()
    version, weights = receiver.receive()
    Path(out_dir, "got.json").write_text(json.dumps({"version": version, "waited_s": time.time() - t0,
                                                     "n": len(weights)}))


def test_receiver_waits_for_the_next_version_longer_than_the_group_timeout(tmp_path: Path) -> None:
    """A learner step (or a wait for trajectories) longer than weight_sync.timeout_s must not make receivers
    leave the group: the wait for the next version has its own, long limit; the transfers keep the group's."""
    ann = WeightsAnnouncement(**{**_announcement(256 * 2**20).__dict__, "world_size": 2})
    ctx = mp.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_slow_receiver, args=(ann.to_bytes(), str(tmp_path), ready, go))
    proc.start()
    # The 1 s group timeout must time the group, not the receiver's start-up: both sides are ready first.
    assert ready.wait(120), "the receiver process did not start"
    go.set()
    sender = WeightSender(ann, timeout_s=1.0)
    sender.connect()
    time.sleep(3.0)  # three group timeouts of "training"
    sender.send(5, _params(5))
    proc.join(30)
    assert proc.exitcode == 0
    got = json.loads((tmp_path / "got.json").read_text())
    assert got["version"] == 5 and got["n"] == len(_params(5))
    assert got["waited_s"] > 2.5


def test_receiver_rejects_a_rank_outside_the_group() -> None:
    ann = _announcement(1024)
    with pytest.raises(ValueError, match="outside the weight-sync group"):
        WeightReceiver(ann, 3, timeout_s=5)


def test_listener_receives_the_next_version_only_after_the_last_one_is_loaded(redis_client) -> None:
    """The receiver reuses its buffers, so the generator's listener must not receive version v+1 while the
    main loop still holds version v's tensors (views into those buffers) — it waits for `release()`."""
    import threading

    from services.config import Config
    from services.control import ControlPlane, Keys
    from services.membership import WeightListener

    ann = WeightsAnnouncement(**{**_announcement(256 * 2**20).__dict__, "world_size": 2, "members": ("g1",)})
    control = ControlPlane(redis_client, Keys("orz:test-listener"))
    control.announce(ann)
    stop = threading.Event()
    listener = WeightListener(Config(), control, "g1", stop)
    listener.start()
    sender = WeightSender(ann, timeout_s=30)
    sender.connect()
    sender.send(1, _params(1))
    for _ in range(200):
        taken = listener.take()
        if taken is not None:
            break
        stop.wait(0.05)
    assert taken is not None and taken[0] == 1
    held = {n: t for n, t in taken[1]}
    v1 = {n: t.clone() for n, t in held.items()}
    second = threading.Thread(target=sender.send, args=(2, _params(2)))
    second.start()
    stop.wait(1.0)
    assert listener.take() is None  # not received: version 1 is still being "loaded"
    for name, tensor in held.items():
        torch.testing.assert_close(tensor, v1[name], rtol=0, atol=0)  # untouched while held
    listener.release()
    second.join(30)
    for _ in range(200):
        taken = listener.take()
        if taken is not None:
            break
        stop.wait(0.05)
    assert taken is not None and taken[0] == 2
    for name, tensor in taken[1]:
        torch.testing.assert_close(tensor, _params(2)[name], rtol=0, atol=0)
    # The same buffers were reused: what was held for version 1 now reads version 2 — hence the handshake.
    torch.testing.assert_close(held["lm_head.weight"], _params(2)["lm_head.weight"], rtol=0, atol=0)
    listener.release()
    sender.stop()
    listener.join(10)
    assert listener.stopped and listener.error is None

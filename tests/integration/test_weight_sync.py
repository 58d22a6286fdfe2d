"""The weight-sync group for real: a learner rank and two generator ranks in separate processes, gloo."""

from __future__ import annotations

import multiprocessing as mp
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.metrics import free_port
from services.protocol import WeightsAnnouncement
from services.weight_sync import STOP_VERSION, WeightReceiver, WeightSender, bucket_layout


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
    sender.stop()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    # 256 MiB holds everything in one bucket; 700 bytes forces one collective per bucket, several buckets.
    assert len(sender.buckets) == (1 if bucket_bytes > 10_000 else 3)
    for rank in (1, 2):
        files = sorted(f.name for f in tmp_path.glob(f"rank{rank}-*"))
        assert files == [f"rank{rank}-v1.safetensors", f"rank{rank}-v2.safetensors"]
        for version in (1, 2):
            weights = load_file(str(tmp_path / f"rank{rank}-v{version}.safetensors"))
            assert set(weights) == set(sent[version])
            for name, tensor in weights.items():
                torch.testing.assert_close(tensor, sent[version][name], rtol=0, atol=0)


def test_receiver_rejects_a_rank_outside_the_group() -> None:
    ann = _announcement(1024)
    with pytest.raises(ValueError, match="outside the weight-sync group"):
        WeightReceiver(ann, 3, timeout_s=5)

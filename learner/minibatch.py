"""Mini-batches for the optimiser steps of one iteration, as ORZ takes its 12 critic steps: the batch's samples
shuffled (seeded by the iteration), then split into `n` mini-batches balanced by tokens, at most one pass.

The split is a function of the whole batch, not of how it is spread over data-parallel ranks: each sample has
a key from its identity (task id and sample index, learner/batch.py), mixed with the iteration; the ranks
all-gather every sample's key and length, sort by key, and deal the samples out in that order, each to the
mini-batch with the fewest tokens so far. One rank and K ranks therefore build the same mini-batches.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.distributed as dist

_MASK = np.uint64(2**63 - 1)


def sample_key(task_id: str, index: int) -> int:
    """A 63-bit identity of sample `index` of the group answering `task_id`."""
    digest = hashlib.blake2b(f"{task_id}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _mix(keys: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of key ⊕ seed: a fresh, deterministic order for every iteration."""
    with np.errstate(over="ignore"):
        z = keys.astype(np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _MASK


def deal(keys: np.ndarray, lengths: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The mini-batch (0 … n−1) of every sample: shuffled by its mixed key, then each in turn to the lightest
    mini-batch so far (ties to the lowest index). With fewer samples than `n`, one sample each."""
    order = np.lexsort((lengths, _mix(keys, seed)))
    out = np.empty(len(keys), dtype=np.int64)
    load = np.zeros(max(1, min(n, len(keys))), dtype=np.int64)
    for i in order.tolist():
        m = int(np.argmin(load))
        out[i] = m
        load[m] += int(lengths[i])
    return out


def assign(keys: torch.Tensor, lengths: torch.Tensor, n: int, seed: int,
           group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, int]:
    """This rank's samples' mini-batches, dealt over the global batch, and how many mini-batches there are."""
    local_keys, local_lengths = keys.cpu().numpy(), lengths.cpu().numpy()
    if group is None:
        out = deal(local_keys, local_lengths, n, seed)
        return torch.from_numpy(out), int(out.max()) + 1
    device = keys.device
    count = torch.tensor([len(local_keys)], dtype=torch.long, device=device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, count, group=group)
    width = int(max(c.item() for c in counts))
    mine = torch.full((2, width), -1, dtype=torch.long, device=device)
    mine[0, : len(local_keys)] = keys.to(device)
    mine[1, : len(local_keys)] = lengths.to(device)
    gathered = [torch.empty_like(mine) for _ in counts]
    dist.all_gather(gathered, mine, group=group)
    rows = [g[:, : int(c.item())].cpu().numpy() for g, c in zip(gathered, counts, strict=True)]
    everything = np.concatenate(rows, axis=1)
    dealt = deal(everything[0], everything[1], n, seed)
    start = sum(int(c.item()) for c in counts[: dist.get_rank(group)])
    return torch.from_numpy(dealt[start: start + len(local_keys)]), int(dealt.max()) + 1

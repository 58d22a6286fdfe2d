"""Turns TrajectoryGroups into padded tensors, and splits a batch into token-budgeted micro-batches.

Layout: each sample is `prompt_ids + response_ids`, right-padded to the longest sequence (`input_ids`,
`attention_mask`, [N, L]). The learner's per-token quantities (log-probs, values, rewards, advantages)
live on a response-aligned grid [N, T]: column t is the t-th response token, whose log-prob comes from the
logits at sequence position `P_i - 1 + t` (`response_index`). `response_mask` is 1 on real response tokens
(a contiguous prefix of each row), which is the layout learner/gae.py expects.

Packed (`learner.packing`): a micro-batch's sequences back to back in one row without padding, position ids
restarting at each, so that attention stays within a sequence (transformers builds a block-diagonal mask
from the position ids; flash-attention runs its varlen kernels on them). The response grid is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from learner.minibatch import sample_key
from services.protocol import TrajectoryGroup


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # long [N, L]
    attention_mask: torch.Tensor  # long [N, L]
    response_index: torch.Tensor  # long [N, T], position in the shifted-logits grid [N, L-1]
    response_mask: torch.Tensor  # float [N, T]
    behavior_logprobs: torch.Tensor  # float [N, T], μ's log-probs from the generator
    rewards: torch.Tensor  # float [N, T], the 0/1 reward on each sample's last token (ORZ)
    seq_lens: torch.Tensor  # long [N]
    group_of: torch.Tensor  # long [N], index of the sample's group
    truncated: torch.Tensor  # bool [N]
    sample_keys: torch.Tensor  # long [N], each sample's identity (learner/minibatch.py)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> RolloutBatch:
        """Every tensor on `device` (the learner's GPU, when it has one)."""
        return RolloutBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """Rows `rows`, trimmed to their own longest sequence and response."""
        width = int(self.seq_lens[rows].max())
        resp = int(self.response_mask[rows].sum(dim=1).max())
        return RolloutBatch(
            self.input_ids[rows, :width], self.attention_mask[rows, :width],
            self.response_index[rows, :resp], self.response_mask[rows, :resp],
            self.behavior_logprobs[rows, :resp], self.rewards[rows, :resp], self.seq_lens[rows],
            self.group_of[rows], self.truncated[rows], self.sample_keys[rows],
        )


@dataclass
class Packed:
    """One micro-batch, padding-free: [1, Σ lengths] tokens and positions; `response_index` [1, N·T] is the
    response grid's positions in the packed row (reshape outputs back to [N, T])."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    response_index: torch.Tensor


def pack(mb: RolloutBatch) -> Packed:
    real = mb.attention_mask.bool()  # right-padded: each row's tokens are a prefix, so row-major order packs them
    offsets = torch.cumsum(mb.seq_lens, 0) - mb.seq_lens
    positions = (mb.attention_mask.cumsum(dim=1) - 1)[real]
    return Packed(mb.input_ids[real][None], positions[None], (mb.response_index + offsets[:, None]).reshape(1, -1))


def build_batch(groups: list[TrajectoryGroup], pad_id: int) -> RolloutBatch:
    rows = [(gi, g.prompt_ids, s, sample_key(g.task_id, si)) for gi, g in enumerate(groups)
            for si, s in enumerate(g.samples) if len(s.response_ids) > 0]
    if not rows:
        raise ValueError("batch has no non-empty responses")
    n = len(rows)
    width = max(len(p) + len(s.response_ids) for _, p, s, _ in rows)
    t_max = max(len(s.response_ids) for _, _, s, _ in rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_index = torch.zeros((n, t_max), dtype=torch.long)
    response_mask = torch.zeros((n, t_max))
    behavior = torch.zeros((n, t_max))
    rewards = torch.zeros((n, t_max))
    seq_lens = torch.zeros(n, dtype=torch.long)
    group_of = torch.zeros(n, dtype=torch.long)
    truncated = torch.zeros(n, dtype=torch.bool)
    keys = torch.tensor([k for *_, k in rows], dtype=torch.long)
    for i, (gi, prompt, s, _) in enumerate(rows):
        p, t = len(prompt), len(s.response_ids)
        if p < 1:
            raise ValueError("a prompt needs at least one token")
        input_ids[i, :p] = torch.as_tensor(prompt, dtype=torch.long)
        input_ids[i, p:p + t] = torch.as_tensor(s.response_ids, dtype=torch.long)
        attention_mask[i, :p + t] = 1
        response_index[i, :t] = torch.arange(p - 1, p - 1 + t)
        response_index[i, t:] = p - 1 + t - 1  # any valid index; masked out
        response_mask[i, :t] = 1.0
        behavior[i, :t] = torch.as_tensor(s.logprobs)
        rewards[i, t - 1] = s.reward  # ORZ: the score sits on the last token
        seq_lens[i] = p + t
        group_of[i] = gi
        truncated[i] = s.finish_reason == "length"
    return RolloutBatch(input_ids, attention_mask, response_index, response_mask, behavior, rewards, seq_lens,
                        group_of, truncated, keys)


def microbatches(batch: RolloutBatch, max_tokens: int, packed: bool = False,
                 rows: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Row indices per micro-batch so that rows × padded width (packed: the sum of the lengths) ≤ max_tokens,
    rows sorted by length; of the rows `rows` only, when given."""
    if rows is not None:
        return [rows[part] for part in microbatches(batch.select(rows), max_tokens, packed)]
    order = torch.argsort(batch.seq_lens, descending=True)
    out: list[torch.Tensor] = []
    current: list[int] = []
    width = 0
    total = 0
    for idx in order.tolist():
        length = int(batch.seq_lens[idx])
        new_width = max(width, length)
        cost = total + length if packed else new_width * (len(current) + 1)
        if current and cost > max_tokens:
            out.append(torch.tensor(current))
            current, new_width, total = [], length, 0
        current.append(idx)
        width = new_width
        total += length
    if current:
        out.append(torch.tensor(current))
    return out

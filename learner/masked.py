"""Masked reductions on the learner's padded response grid, used by the losses, the trainer and GAE's callers.

Layout (learner/batch.py): tensors are [B, T], column t is the t-th response token, and `mask` is 1 on a
row's valid response tokens. Masks are read as 0/1: a position either counts or it does not, and whatever
a masked position holds (padding, NaN) never reaches a result.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over positions where `mask` is 1 (over all of them, or along `dim`).

    An empty mask gives 0 rather than NaN, so that a micro-batch with no valid tokens cannot poison a
    gradient accumulation with NaNs.
    """
    valid = mask.bool()
    x = torch.where(valid, x, torch.zeros_like(x))
    if dim is None:
        return x.sum() / valid.sum().clamp(min=1)
    return x.sum(dim=dim) / valid.sum(dim=dim).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Batch-level normalisation over all valid tokens: (x − mean) / std, zero where masked.

    As ORZ's `normalize_advantages` (orz/ppo/utils.py): one mean and one population variance over every
    valid token of the batch, and std = sqrt(max(var, eps)) — `eps` bounds the variance, not the std.
    """
    valid = mask.bool()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var.clamp(min=eps))
    return torch.where(valid, whitened, torch.zeros_like(whitened))

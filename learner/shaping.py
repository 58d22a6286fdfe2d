"""Reward shaping the learner applies before advantages: DAPO's soft overlong punishment.

A response of length |y| ≤ L − B (L = `sampling.max_tokens`, B = `learner.overlong_buffer_tokens`) keeps its
reward; one that runs into the last B tokens before the cap loses `learner.overlong_penalty` × (|y| − (L − B)) / B,
linearly, up to the whole penalty at |y| = L (a truncated response). Off with B = 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, max_tokens: int, buffer_tokens: int, penalty: float) -> Tensor:
    """The (non-positive) reward added to each sample, from its response length. [N] → [N]."""
    if buffer_tokens <= 0 or penalty == 0:
        return torch.zeros_like(lengths, dtype=torch.float64)
    if buffer_tokens > max_tokens:
        raise ValueError(f"overlong_buffer_tokens ({buffer_tokens}) exceeds max_tokens ({max_tokens})")
    over = (lengths.to(torch.float64) - (max_tokens - buffer_tokens)).clamp(min=0, max=buffer_tokens)
    return -penalty * over / buffer_tokens

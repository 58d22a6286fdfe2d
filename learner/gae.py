"""GAE advantages and returns on the learner's padded response grid.

Runs in the learner process only; pure tensor functions, no state. Layout (learner/batch.py): tensors are
[B, T], column t is the t-th response token, and `mask` is 1 on a row's valid response tokens (a contiguous
prefix; rows are right-padded). Masks are read as 0/1: a position either counts or it does not, and
whatever a masked position holds (padding, NaN) never reaches a result.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", arXiv:1506.02438, Sec. 3), written as CleanRL's reverse loop over time:

        δ_t = r_t + γ V_{t+1} − V_t
        A_t = δ_t + γλ A_{t+1}
        R_t = A_t + V_t

    Each row is one episode that ends after its last valid token, so V and A after it are 0. With ORZ's
    γ = λ = 1 and the reward on the last token only, A_t = r_T − V_t and R_t = r_T.

    Args: rewards, values, mask: [B, T] on the response grid. Returns (advantages, returns), [B, T], zero
    where `mask` is 0. Both are regression/loss targets, so they are computed without gradient.
    """
    valid = mask.bool()
    values = torch.where(valid, values, torch.zeros_like(values))
    rewards = torch.where(valid, rewards.to(values.dtype), torch.zeros_like(values))
    not_done = valid.to(values.dtype)  # CleanRL's `nextnonterminal`: 0 past a row's last valid token

    batch_size, horizon = values.shape
    advantages = torch.zeros_like(values)
    last_gae = values.new_zeros(batch_size)
    for t in reversed(range(horizon)):
        if t + 1 < horizon:
            next_nonterminal = not_done[:, t + 1]
            next_values = values[:, t + 1]
        else:
            next_nonterminal = values.new_zeros(batch_size)
            next_values = values.new_zeros(batch_size)
        delta = rewards[:, t] + gamma * next_values * next_nonterminal - values[:, t]
        last_gae = (delta + gamma * lam * next_nonterminal * last_gae) * not_done[:, t]
        advantages[:, t] = last_gae
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns

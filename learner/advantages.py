"""Outcome-reward advantage estimators without a critic: GRPO and RLOO, on the learner's response grid.

Runs in the learner process only; pure tensor functions. ORZ trains with GAE (learner/gae.py) and a learned
critic; the ORZ paper compares that against GRPO, so both live on one stack (`learner.advantage`). Each
sample's outcome reward is the sum of its row of `rewards` (ORZ puts the 0/1 score on the last token), and
the estimate is broadcast to every valid token of the sample, as GRPO's "outcome supervision" does.

Groups are the samples of one prompt (`group_of`, from learner/batch.py). A sample whose response was
empty never reaches the batch, so a group may hold fewer than `n_samples` rows; statistics use the rows
present.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _group_sums(values: Tensor, group_of: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group sum of `values` and per-group count, both indexed by group id."""
    n_groups = int(group_of.max()) + 1
    sums = values.new_zeros(n_groups).index_add_(0, group_of, values)
    counts = values.new_zeros(n_groups).index_add_(0, group_of, torch.ones_like(values))
    return sums, counts


@torch.no_grad()
def grpo_advantages(rewards: Tensor, mask: Tensor, group_of: Tensor, scale_by_std: bool = True,
                    eps: float = 1e-6) -> Tensor:
    """GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, Sec. 4.1.2, outcome supervision):

        A_i = (r_i − mean_g(r)) / (std_g(r) + eps)

    with the group's sample standard deviation (Bessel-corrected, as TRL's and verl's `torch.std`); a group
    of one sample has std 0 and advantage 0. `scale_by_std=False` is Dr. GRPO (Liu et al. 2025,
    arXiv:2503.20783): the mean baseline only. Returns [B, T], zero where `mask` is 0.
    """
    scores = (rewards * mask).sum(dim=1)
    sums, counts = _group_sums(scores, group_of)
    mean = sums / counts
    centred = scores - mean[group_of]
    if scale_by_std:
        sq, _ = _group_sums(centred**2, group_of)
        std = torch.sqrt(sq / (counts - 1).clamp(min=1))
        centred = centred / (std[group_of] + eps)
    return centred[:, None] * mask


@torch.no_grad()
def rloo_advantages(rewards: Tensor, mask: Tensor, group_of: Tensor) -> Tensor:
    """RLOO (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free"; Ahmadian et al. 2024,
    arXiv:2402.14740): each sample's baseline is the mean reward of the *other* samples of its group,

        A_i = r_i − (Σ_{j≠i} r_j) / (k − 1)

    A group of one sample has no baseline and gets advantage 0. Returns [B, T], zero where `mask` is 0.
    """
    scores = (rewards * mask).sum(dim=1)
    sums, counts = _group_sums(scores, group_of)
    k = counts[group_of]
    others = (sums[group_of] - scores) / (k - 1).clamp(min=1)
    adv = torch.where(k > 1, scores - others, torch.zeros_like(scores))
    return adv[:, None] * mask

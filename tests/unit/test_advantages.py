"""learner/advantages.py (GRPO, RLOO) against hand-worked numbers and brute force over python floats."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from learner.advantages import grpo_advantages, rloo_advantages


def _grid(scores: list[float], lengths: list[int], horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards with the score on each row's last valid token, junk (7.0) in the padding; prefix masks."""
    rewards = torch.full((len(scores), horizon), 7.0, dtype=torch.float64)
    mask = torch.zeros((len(scores), horizon), dtype=torch.float64)
    for i, (s, n) in enumerate(zip(scores, lengths, strict=True)):
        rewards[i, :n] = 0.0
        rewards[i, n - 1] = s
        mask[i, :n] = 1.0
    return rewards, mask


def brute_grpo(scores: list[float], groups: list[int], scale: bool, eps: float = 1e-6) -> list[float]:
    out = []
    for i, s in enumerate(scores):
        mates = [scores[j] for j in range(len(scores)) if groups[j] == groups[i]]
        mean = statistics.fmean(mates)
        std = statistics.stdev(mates) if len(mates) > 1 else 0.0
        out.append((s - mean) / (std + eps) if scale else s - mean)
    return out


def brute_rloo(scores: list[float], groups: list[int]) -> list[float]:
    out = []
    for i, s in enumerate(scores):
        others = [scores[j] for j in range(len(scores)) if groups[j] == groups[i] and j != i]
        out.append(s - sum(others) / len(others) if others else 0.0)
    return out


def test_grpo_hand_worked() -> None:
    # One group, rewards [1, 0, 0, 1]: mean 0.5; sample variance (4 · 0.25) / 3 = 1/3, std = 0.57735;
    # A = ±0.5 / 0.57735 = ±0.866025 (eps = 1e-6 shifts the 7th digit).
    rewards, mask = _grid([1, 0, 0, 1], [3, 1, 2, 2], 4)
    adv = grpo_advantages(rewards, mask, torch.tensor([0, 0, 0, 0]))
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert adv[:, 0].tolist() == pytest.approx([expected, -expected, -expected, expected], rel=1e-12)
    # Broadcast to every valid token, exactly 0 on padding (where the junk 7.0 sits).
    assert adv[0].tolist() == pytest.approx([expected] * 3 + [0.0])
    assert adv[1].tolist() == pytest.approx([-expected, 0.0, 0.0, 0.0])


def test_rloo_hand_worked() -> None:
    # Rewards [1, 0, 0]: baselines (0+0)/2 = 0, (1+0)/2 = 0.5, 0.5 → A = [1, −0.5, −0.5]; their sum is 0.
    rewards, mask = _grid([1, 0, 0], [2, 2, 1], 2)
    adv = rloo_advantages(rewards, mask, torch.tensor([0, 0, 0]))
    assert adv.tolist() == [[1.0, 1.0], [-0.5, -0.5], [-0.5, 0.0]]


def test_degenerate_groups_give_zero_not_nan() -> None:
    # All-equal rewards (std 0) and a group of one: advantage 0, no NaN or inf, for both estimators.
    rewards, mask = _grid([1, 1, 1, 0], [2, 3, 1, 2], 3)
    groups = torch.tensor([0, 0, 0, 1])
    for adv in (grpo_advantages(rewards, mask, groups), grpo_advantages(rewards, mask, groups, scale_by_std=False),
                rloo_advantages(rewards, mask, groups)):
        assert torch.isfinite(adv).all()
        assert adv.abs().max().item() == 0.0


def test_dr_grpo_is_the_mean_baseline() -> None:
    # scale_by_std=False: A = r − mean_g(r); group {0.2, 0.6, 1.0} → mean 0.6 → [−0.4, 0, 0.4].
    rewards, mask = _grid([0.2, 0.6, 1.0], [1, 1, 1], 1)
    adv = grpo_advantages(rewards, mask, torch.tensor([0, 0, 0]), scale_by_std=False)
    assert adv[:, 0].tolist() == pytest.approx([-0.4, 0.0, 0.4], abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_match_brute_force(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n_groups = int(torch.randint(1, 6, (1,), generator=gen))
    sizes = torch.randint(1, 6, (n_groups,), generator=gen).tolist()
    groups = [g for g, k in enumerate(sizes) for _ in range(k)]
    perm = torch.randperm(len(groups), generator=gen).tolist()  # rows of a group need not be adjacent
    groups = [groups[i] for i in perm]
    scores = [float(x) for x in torch.randint(0, 2, (len(groups),), generator=gen)]
    scores = [s + 0.25 * float(torch.rand(1, generator=gen)) if seed % 2 else s for s in scores]  # non-binary too
    horizon = 9
    lengths = torch.randint(1, horizon + 1, (len(groups),), generator=gen).tolist()
    rewards, mask = _grid(scores, lengths, horizon)
    group_of = torch.tensor(groups)

    for adv, expected in (
        (grpo_advantages(rewards, mask, group_of), brute_grpo(scores, groups, True)),
        (grpo_advantages(rewards, mask, group_of, scale_by_std=False), brute_grpo(scores, groups, False)),
        (rloo_advantages(rewards, mask, group_of), brute_rloo(scores, groups)),
    ):
        for i, n in enumerate(lengths):
            assert adv[i, :n].tolist() == pytest.approx([expected[i]] * n, rel=1e-9, abs=1e-12)
            assert adv[i, n:].abs().sum().item() == 0.0

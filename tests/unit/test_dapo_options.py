"""The DAPO-family loss options against references written out in plain Python loops: each loss aggregation
(value and gradient), clip-higher at both edges, the overlong penalty at each boundary token, and masked
truncated samples."""

from __future__ import annotations

import math
import random

import pytest
import torch

from learner.loss import aggregate, ppo_policy_loss
from learner.shaping import overlong_penalty
from services.config import Config, LearnerConfig


def _ragged(seed: int = 0, rows: int = 5, width: int = 7) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    rng = random.Random(seed)
    lens = [rng.randint(0, width) for _ in range(rows)]
    lens[0] = width  # one full row
    lens[1] = 0  # one empty row: no sequence, no token
    values = torch.tensor([[rng.uniform(-2, 2) for _ in range(width)] for _ in range(rows)], dtype=torch.float64)
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(width)] for n in lens], dtype=torch.float64)
    values[mask == 0] = float("nan")  # padding must never reach the result
    return values, mask, lens


def _reference(values: torch.Tensor, lens: list[int], agg: str, norm: int) -> float:
    rows = [[float(values[i, t]) for t in range(n)] for i, n in enumerate(lens) if n > 0]
    if agg == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if agg == "seq_mean_token_mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    return sum(sum(r) / norm for r in rows) / len(rows)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_each_aggregation_and_its_gradient(agg: str) -> None:
    values, mask, lens = _ragged()
    x = values.clone().nan_to_num(0.0).requires_grad_(True)
    got = aggregate(torch.where(mask.bool(), x, values), mask, agg, norm_tokens=10)
    assert got.item() == pytest.approx(_reference(values, lens, agg, 10), rel=1e-12)
    got.backward()
    n_seq = sum(1 for n in lens if n > 0)
    for i, n in enumerate(lens):
        for t in range(values.shape[1]):
            want = 0.0
            if t < n:  # ∂/∂l_it, by hand
                want = {"token_mean": 1 / sum(lens), "seq_mean_token_mean": 1 / (n_seq * n),
                        "seq_mean_token_sum_norm": 1 / (n_seq * 10)}[agg]
            assert x.grad[i, t].item() == pytest.approx(want, rel=1e-12, abs=1e-15), (i, t)


def test_an_empty_mask_aggregates_to_zero_not_nan() -> None:
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        assert aggregate(torch.ones(2, 3), torch.zeros(2, 3), agg, 4).item() == 0.0


def _one_token_loss(ratio: float, adv: float, low: float, high: float | None) -> tuple[float, float]:
    """(loss, clipped?) of one token through ppo_policy_loss, with π_prox = μ (w = 1)."""
    lp = torch.tensor([[math.log(ratio)]], dtype=torch.float64)
    zero = torch.zeros(1, 1, dtype=torch.float64)
    loss, st = ppo_policy_loss(lp, zero, zero, torch.tensor([[adv]], dtype=torch.float64), torch.ones(1, 1),
                               low, 2.0, "token", clip_eps_high=high)
    return loss.item(), st["clipfrac"]


@pytest.mark.parametrize(("ratio", "adv", "loss", "clipped"), [
    (1.30, 1.0, -1.28, 1.0),   # above 1 + 0.28 with A > 0: clipped at the high edge
    (1.25, 1.0, -1.25, 0.0),   # inside the raised edge: not clipped (with symmetric 0.2 it would be)
    (0.70, -1.0, 0.80, 1.0),   # below 1 − 0.2 with A < 0: clipped at the low edge, unchanged by clip-higher
    (0.85, -1.0, 0.85, 0.0),   # inside the low edge
    (1.30, -1.0, 1.30, 0.0),   # above the high edge with A < 0: the unclipped term is the minimum
    (0.70, 1.0, -0.70, 0.0),   # below the low edge with A > 0: likewise
])
def test_clip_higher_at_both_edges(ratio: float, adv: float, loss: float, clipped: float) -> None:
    # L = −min(r·A, clip(r, 1 − 0.2, 1 + 0.28)·A), by hand for each case
    got, frac = _one_token_loss(ratio, adv, 0.2, 0.28)
    assert got == pytest.approx(loss, rel=1e-12) and frac == clipped


def test_clip_eps_high_unset_is_the_symmetric_clip() -> None:
    assert _one_token_loss(1.25, 1.0, 0.2, None) == pytest.approx((-1.2, 1.0))
    assert _one_token_loss(1.25, 1.0, 0.2, 0.2) == _one_token_loss(1.25, 1.0, 0.2, None)


def test_overlong_penalty_at_each_boundary_token() -> None:
    # max_tokens 10, buffer 4: free up to 6 tokens, then −p·(|y| − 6)/4 up to −p at 10
    lens = torch.tensor([0, 5, 6, 7, 8, 9, 10])
    got = overlong_penalty(lens, 10, 4, 0.5).tolist()
    assert got == pytest.approx([0, 0, 0, -0.125, -0.25, -0.375, -0.5])
    assert overlong_penalty(lens, 10, 0, 0.5).tolist() == [0.0] * 7  # off
    with pytest.raises(ValueError, match="exceeds max_tokens"):
        overlong_penalty(lens, 10, 11, 1.0)


def test_masked_truncated_samples_leave_the_policy_loss() -> None:
    """mask_truncated: the policy mask drops a truncated row; the loss is then exactly the loss of the
    others (what the trainer passes ppo_policy_loss, learner/trainer.py)."""
    torch.manual_seed(0)
    lp = torch.randn(3, 4, dtype=torch.float64) * 0.1
    adv = torch.randn(3, 4, dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.float64)
    truncated = torch.tensor([False, True, False])
    policy_mask = mask * (~truncated).to(mask.dtype)[:, None]
    zero = torch.zeros(3, 4, dtype=torch.float64)
    masked, _ = ppo_policy_loss(lp, zero, zero, adv, policy_mask, 0.2, 2.0)
    kept, _ = ppo_policy_loss(lp[[0, 2]], zero[:2], zero[:2], adv[[0, 2]], mask[:2], 0.2, 2.0)
    assert masked.item() == pytest.approx(kept.item(), rel=1e-12)


def _masked(prox_over_mu: list[list[float]], level: str, low: float, high: float, lens: list[int] | None = None):
    ratios = torch.tensor(prox_over_mu, dtype=torch.float64)
    mask = torch.ones_like(ratios) if lens is None else torch.tensor(
        [[1.0 if t < n else 0.0 for t in range(ratios.shape[1])] for n in lens], dtype=torch.float64)
    behavior = -torch.log(ratios)  # μ's log-prob with π_prox's at 0: π_prox/μ = ratios
    zero = torch.zeros_like(ratios)
    adv = torch.ones_like(ratios)
    return ppo_policy_loss(zero, zero, behavior, adv, mask, 0.2, 2.0, level, is_mode="mask", is_low=low,
                           is_high=high)


def test_masked_is_at_the_token_level_keeps_both_bounds_and_drops_beyond() -> None:
    # π_θ = π_prox (r = 1, A = 1): each kept token contributes −w, a dropped one 0; the mean is over all 6
    loss, st = _masked([[0.5, 0.49, 1.0], [2.0, 2.01, 1.5]], "token", 0.5, 2.0)
    kept = [0.5, 1.0, 2.0, 1.5]  # 0.49 and 2.01 are outside [0.5, 2]
    assert loss.item() == pytest.approx(-sum(kept) / 6, rel=1e-9)
    assert st["is_masked_frac"] == pytest.approx(2 / 6) and st["is_truncated_frac"] == 0.0


def test_masked_is_at_the_sequence_level_uses_the_geometric_mean() -> None:
    # row 0: geometric mean of 4 and 1 over its 2 valid tokens = 2 (kept, at the bound); row 1: of 9 and 1 = 3
    # (dropped); row 2: of 0.25 and 1 = 0.5 (kept, at the low bound). A padded token is never counted.
    loss, st = _masked([[4.0, 1.0, 7.0], [9.0, 1.0, 1.0], [0.25, 1.0, 1.0]], "sequence", 0.5, 2.0, lens=[2, 2, 2])
    weights = [2.0, 2.0, 0.0, 0.0, 0.5, 0.5]
    assert loss.item() == pytest.approx(-sum(weights) / 6, rel=1e-9)
    assert st["is_masked_frac"] == pytest.approx(2 / 6)


def test_masked_is_sequence_weight_of_a_long_sample_does_not_overflow() -> None:
    loss, st = _masked([[1e30] * 8], "sequence", 0.5, 2.0)
    assert math.isfinite(loss.item()) and loss.item() == 0.0 and st["is_masked_frac"] == 1.0


def test_clip_eps_low_moves_only_the_lower_edge() -> None:
    # ε_low 0.1: r = 0.85 with A < 0 is now below 1 − 0.1, so L = −min(−0.85, −0.9) = 0.9, clipped
    assert _one_token_loss(0.85, -1.0, 0.1, 0.28) == pytest.approx((0.9, 1.0))
    assert _one_token_loss(1.25, 1.0, 0.1, 0.28) == pytest.approx((-1.25, 0.0))  # upper edge untouched


def test_clip_and_is_level_keys_resolve_as_documented() -> None:
    assert LearnerConfig().clip_edges == (0.2, 0.2)
    assert LearnerConfig(clip_eps=0.3).clip_edges == (0.3, 0.3)  # the symmetric shorthand
    assert LearnerConfig(clip_eps_low=0.1, clip_eps_high=0.28).clip_edges == (0.1, 0.28)
    assert LearnerConfig(clip_eps_high=0.28).clip_edges == (0.2, 0.28)
    assert LearnerConfig().is_weight == "token"
    assert LearnerConfig(is_level="sequence").is_weight == "sequence"
    assert LearnerConfig(is_correction="sequence", is_level="token").is_weight == "token"
    assert LearnerConfig(is_correction="none").is_weight == "none"
    with pytest.raises(ValueError, match="is_level .* needs an importance weight"):
        Config.model_validate({"learner": {"is_correction": "none", "is_level": "token"}})

"""learner/loss.py against hand-worked numbers: the decoupled PPO loss, its gradient, its stats, the value loss.

Token inputs are built from the ratios we want: with π_prox fixed, logprobs = log π_prox + log r and
behavior_logprobs = log π_prox − log ρ, where r = π_θ/π_prox and ρ = π_prox/μ. ε = 0.2, c = 2 throughout.
"""

from __future__ import annotations

import math

import pytest
import torch

from learner.loss import explained_variance, ppo_policy_loss, value_loss

EPS = 0.2
CAP = 2.0
F64 = torch.float64


def make_inputs(
    ratios: list[float], advantages: list[float], rhos: list[float] | None = None, n_pad: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row: the given tokens, then `n_pad` padded tokens holding ordinary-looking values."""
    n = len(ratios)
    rhos = rhos if rhos is not None else [1.0] * n
    proximal = torch.linspace(-2.5, -0.1, n + n_pad, dtype=F64)[None, :]  # any log-probs will do
    log_r = torch.tensor([math.log(r) for r in ratios] + [0.3] * n_pad, dtype=F64)[None, :]
    log_rho = torch.tensor([math.log(p) for p in rhos] + [-0.7] * n_pad, dtype=F64)[None, :]
    logprobs = (proximal + log_r).requires_grad_(True)
    behavior = proximal - log_rho
    adv = torch.tensor(advantages + [5.0] * n_pad, dtype=F64)[None, :]
    mask = torch.tensor([1.0] * n + [0.0] * n_pad, dtype=F64)[None, :]
    return logprobs, proximal, behavior, adv, mask


def loss_and_grad(ratios, advantages, rhos=None, n_pad=0):
    logprobs, proximal, behavior, adv, mask = make_inputs(ratios, advantages, rhos, n_pad)
    loss, stats = ppo_policy_loss(logprobs, proximal, behavior, adv, mask, EPS, CAP)
    (grad,) = torch.autograd.grad(loss, logprobs)
    return loss.item(), stats, grad[0].tolist()


def test_ratio_inside_clip_range() -> None:
    # r = 1.1 ∈ [0.8, 1.2], A = 2: min(1.1·2, clip(1.1)·2) = 2.2, L = −2.2.
    # dL/dlogπ_θ = −w·A·dr/dlogπ_θ = −w·A·r = −1·2·1.1 = −2.2.
    loss, stats, grad = loss_and_grad([1.1], [2.0])
    assert loss == pytest.approx(-2.2)
    assert grad == pytest.approx([-2.2])
    assert stats["clipfrac"] == 0.0
    assert stats["policy_loss"] == pytest.approx(-2.2)
    assert stats["approx_kl"] == pytest.approx((1.1 - 1) - math.log(1.1))  # k3 = 0.1 − 0.09531 = 0.00469
    assert stats["is_weight_mean"] == pytest.approx(1.0) and stats["is_truncated_frac"] == 0.0
    assert stats["behavior_kl"] == pytest.approx(0.0, abs=1e-12)


def test_ratio_above_clip_with_positive_advantage_is_clipped() -> None:
    # r = 1.5 > 1.2, A = 1: min(1.5·1, 1.2·1) = 1.2 (the clipped branch, a constant), L = −1.2, gradient 0.
    loss, stats, grad = loss_and_grad([1.5], [1.0])
    assert loss == pytest.approx(-1.2)
    assert grad == [0.0]
    assert stats["clipfrac"] == 1.0
    assert stats["approx_kl"] == pytest.approx(0.5 - math.log(1.5))  # 0.5 − 0.405465 = 0.094535


def test_ratio_below_clip_with_negative_advantage_is_clipped() -> None:
    # r = 0.5 < 0.8, A = −1: min(0.5·(−1), 0.8·(−1)) = min(−0.5, −0.8) = −0.8 (clipped), L = 0.8, gradient 0.
    loss, stats, grad = loss_and_grad([0.5], [-1.0])
    assert loss == pytest.approx(0.8)
    assert grad == [0.0]
    assert stats["clipfrac"] == 1.0


def test_pessimistic_sides_stay_unclipped() -> None:
    # r = 1.5, A = −1: min(−1.5, 1.2·(−1)) = −1.5, the unclipped branch: L = 1.5, dL/dlogπ_θ = −(−1)·1.5 = 1.5.
    loss, stats, grad = loss_and_grad([1.5], [-1.0])
    assert loss == pytest.approx(1.5)
    assert grad == pytest.approx([1.5])
    assert stats["clipfrac"] == 0.0
    # r = 0.5, A = 1: min(0.5, 0.8) = 0.5, unclipped: L = −0.5, dL/dlogπ_θ = −1·0.5 = −0.5.
    loss, stats, grad = loss_and_grad([0.5], [1.0])
    assert loss == pytest.approx(-0.5)
    assert grad == pytest.approx([-0.5])
    assert stats["clipfrac"] == 0.0


def test_token_level_mean_and_clipfrac_over_a_batch() -> None:
    # The four cases above in one row, plus 2 padded tokens. Per-token min terms: 1.2, −0.8, −1.5, 2.2.
    #   L = −(1.2 − 0.8 − 1.5 + 2.2) / 4 = −1.1 / 4 = −0.275
    #   dL/dlogπ_θ = [0, 0, −(−1)(1.5)/4, −(2)(1.1)/4] = [0, 0, 0.375, −0.55], and 0 on the padding
    #   clipfrac = 2 clipped / 4 valid = 0.5 (padding not counted)
    loss, stats, grad = loss_and_grad([1.5, 0.5, 1.5, 1.1], [1.0, -1.0, -1.0, 2.0], n_pad=2)
    assert loss == pytest.approx(-0.275)
    assert grad == pytest.approx([0.0, 0.0, 0.375, -0.55, 0.0, 0.0])
    assert stats["clipfrac"] == 0.5


def test_importance_weight_truncation() -> None:
    # r = 1, A = 1; ρ = π_prox/μ = 3 > c = 2 → w = 2 (truncated); ρ = 0.5 → w = 0.5 (exact).
    #   L = −(2·1 + 0.5·1) / 2 = −1.25; is_weight_mean = 1.25; is_truncated_frac = 1/2
    #   dL/dlogπ_θ = −w·A·r / N = [−2/2, −0.5/2] = [−1, −0.25]: w scales the gradient as a constant
    #   behavior_kl = mean over tokens of (ρ − 1) − log ρ = ((2 − ln 3) + (−0.5 + ln 2)) / 2
    #               = (0.901388 + 0.193147) / 2 = 0.547268
    loss, stats, grad = loss_and_grad([1.0, 1.0], [1.0, 1.0], rhos=[3.0, 0.5])
    assert loss == pytest.approx(-1.25)
    assert grad == pytest.approx([-1.0, -0.25])
    assert stats["is_weight_mean"] == pytest.approx(1.25)
    assert stats["is_truncated_frac"] == 0.5
    assert stats["behavior_kl"] == pytest.approx(((2 - math.log(3)) + (-0.5 + math.log(2))) / 2)
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-12)


def test_importance_weight_carries_no_gradient() -> None:
    logprobs, proximal, behavior, adv, mask = make_inputs([1.1, 0.9], [1.0, -1.0], rhos=[3.0, 0.5])
    proximal.requires_grad_(True)
    behavior.requires_grad_(True)
    loss, _ = ppo_policy_loss(logprobs, proximal, behavior, adv, mask, EPS, CAP)
    grads = torch.autograd.grad(loss, [logprobs, proximal, behavior], allow_unused=True)
    assert grads[0] is not None
    assert grads[1] is None and grads[2] is None  # π_prox and μ are constants; only π_θ is optimised


def test_masked_tokens_do_not_matter() -> None:
    gen = torch.Generator().manual_seed(0)
    shape = (3, 7)
    lengths = torch.tensor([7, 4, 1])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).to(F64)
    pad = mask == 0
    proximal = -torch.rand(shape, generator=gen, dtype=F64) * 3
    logprobs = proximal + 0.3 * torch.randn(shape, generator=gen, dtype=F64)
    behavior = proximal + 0.5 * torch.randn(shape, generator=gen, dtype=F64)
    adv = torch.randn(shape, generator=gen, dtype=F64)

    def run(lp, prox, beh, a):
        lp = lp.clone().requires_grad_(True)
        loss, stats = ppo_policy_loss(lp, prox, beh, a, mask, EPS, CAP)
        (grad,) = torch.autograd.grad(loss, lp)
        return loss, stats, grad

    loss, stats, grad = run(logprobs, proximal, behavior, adv)
    # What padding may hold: the generator's 0-padding, −inf log-probs, NaN, huge numbers.
    for junk in [(0.0, float("-inf"), float("nan"), 1e6), (float("nan"), 0.0, 0.0, float("nan"))]:
        junk_loss, junk_stats, junk_grad = run(
            logprobs.masked_fill(pad, junk[0]),
            proximal.masked_fill(pad, junk[1]),
            behavior.masked_fill(pad, junk[2]),
            adv.masked_fill(pad, junk[3]),
        )
        assert torch.equal(junk_loss, loss)
        assert junk_stats == stats
        assert torch.equal(junk_grad, grad)
    assert torch.isfinite(grad).all() and grad[pad].eq(0).all()


def test_matches_per_token_reference_and_reduces_to_ppo_without_staleness() -> None:
    # A python-float loop over tokens, the formula of docs/architecture.md written out once more.
    gen = torch.Generator().manual_seed(1)
    proximal = -torch.rand(4, 6, generator=gen, dtype=F64) * 3
    logprobs = proximal + 0.4 * torch.randn(4, 6, generator=gen, dtype=F64)
    behavior = proximal + 0.8 * torch.randn(4, 6, generator=gen, dtype=F64)
    adv = torch.randn(4, 6, generator=gen, dtype=F64)
    mask = (torch.arange(6)[None, :] < torch.tensor([6, 3, 5, 2])[:, None]).to(F64)

    def reference(beh: torch.Tensor) -> float:
        total, count = 0.0, 0
        for b in range(4):
            for t in range(6):
                if mask[b, t] == 0:
                    continue
                r = math.exp(logprobs[b, t].item() - proximal[b, t].item())
                w = min(math.exp(proximal[b, t].item() - beh[b, t].item()), CAP)
                a = adv[b, t].item()
                total += w * min(r * a, min(max(r, 1 - EPS), 1 + EPS) * a)
                count += 1
        return -total / count

    loss, _ = ppo_policy_loss(logprobs, proximal, behavior, adv, mask, EPS, CAP)
    assert loss.item() == pytest.approx(reference(behavior))

    # μ = π_prox (max_staleness = 0, matching numerics): w = 1 and the loss is ORZ's clipped PPO.
    loss, stats = ppo_policy_loss(logprobs, proximal, proximal, adv, mask, EPS, CAP)
    assert loss.item() == pytest.approx(reference(proximal))
    assert stats["is_weight_mean"] == 1.0 and stats["is_truncated_frac"] == 0.0 and stats["behavior_kl"] == 0.0


def test_value_loss_by_hand() -> None:
    # ε_v = 0.2. Tokens (V_old, V, R), then one padded token:
    #   1: (0.5, 0.6, 1.0)  V − V_old = 0.1 inside the clip: V_clip = V, both squares (0.4)² = 0.16
    #   2: (0.0, 0.9, 1.0)  moved 0.9 towards R: V_clip = 0.2; (V−R)² = 0.01, (V_clip−R)² = 0.64
    #                       → the clipped term wins (0.64), gradient wrt V is 0
    #   3: (0.0, −0.5, 1.0) moved away from R: V_clip = −0.2; (V−R)² = 2.25, (V_clip−R)² = 1.44
    #                       → the unclipped term wins (2.25)
    #   L_v = ½ · (0.16 + 0.64 + 2.25) / 3 = 1.525 / 3 = 0.508333…
    #   dL_v/dV = ½ · 2(V − R) / 3 on unclipped tokens: [−0.4/3, 0, −1.5/3] = [−0.1333, 0, −0.5], pad 0
    #   value_clipfrac = 1/3
    old_values = torch.tensor([[0.5, 0.0, 0.0, 3.0]], dtype=F64)
    values = torch.tensor([[0.6, 0.9, -0.5, float("nan")]], dtype=F64, requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 1.0, -7.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=F64)
    loss, stats = value_loss(values, old_values, returns, mask, value_clip=0.2)
    (grad,) = torch.autograd.grad(loss, values)
    assert loss.item() == pytest.approx(1.525 / 3)
    assert stats["value_loss"] == pytest.approx(1.525 / 3)
    assert stats["value_clipfrac"] == pytest.approx(1 / 3)
    assert grad[0].tolist() == pytest.approx([-0.4 / 3, 0.0, -0.5, 0.0])


def test_explained_variance_by_hand() -> None:
    # Valid tokens: R = [1, 2, 3, 4], V = [1, 2, 2, 4] (a fifth, padded token holds junk).
    #   Var[R]     = mean((R − 2.5)²) = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    #   R − V      = [0, 0, 1, 0], mean 0.25
    #   Var[R − V] = (3·0.0625 + 0.5625) / 4 = 0.1875
    #   EV         = 1 − 0.1875 / 1.25 = 0.85
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, 0.0]], dtype=F64)
    values = torch.tensor([[1.0, 2.0, 2.0], [4.0, -9.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=F64)
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.85)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)  # perfect critic
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0)
    # Every return equal (ORZ, γ = λ = 1, all rewards in the batch 0): undefined, NaN.
    assert math.isnan(explained_variance(values, torch.zeros_like(returns), mask).item())

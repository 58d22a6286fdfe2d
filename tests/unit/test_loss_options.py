"""The loss's options: sequence-level importance weights, the KL term, the entropy — against brute force."""

from __future__ import annotations

import math

import pytest
import torch

from learner.loss import entropy_from_logits, kl_penalty, ppo_policy_loss

F64 = torch.float64


def brute_sequence_loss(rows, eps: float, cap: float) -> tuple[float, float, float]:
    """rows: (log r_t, log ρ_t, A_t) per valid token, where r = π_θ/π_prox and ρ = π_prox/μ.
    Returns (loss, mean IS weight over tokens, truncated-token fraction), token mean over the batch."""
    total, weights, truncated, count = 0.0, 0.0, 0.0, 0
    for toks in rows:
        log_w = sum(lr for _, lr, _ in toks)
        w = min(math.exp(min(log_w, 700.0)), cap)
        for log_r, _, a in toks:
            r = math.exp(log_r)
            total += w * min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
            weights += w
            truncated += log_w > math.log(cap)
            count += 1
    return -total / count, weights / count, truncated / count


def _tensors(rows, horizon: int):
    n = len(rows)
    prox = torch.full((n, horizon), -1.3, dtype=F64)
    logp = prox.clone()
    beh = prox.clone()
    adv = torch.full((n, horizon), 9.0, dtype=F64)  # junk in the padding
    mask = torch.zeros((n, horizon), dtype=F64)
    for i, toks in enumerate(rows):
        for t, (log_r, log_rho, a) in enumerate(toks):
            logp[i, t] = prox[i, t] + log_r
            beh[i, t] = prox[i, t] - log_rho
            adv[i, t] = a
            mask[i, t] = 1
    return logp.requires_grad_(True), prox, beh, adv, mask


def test_sequence_level_weights() -> None:
    # Row 0: Σ log ρ = 0.3 − 0.1 = 0.2 → w = e^0.2 = 1.2214 < 2; row 1: Σ log ρ = 0.5 + 0.4 + 0.3 = 1.2 →
    # e^1.2 = 3.32 > 2, so w = 2 on all three of its tokens.
    rows = [[(0.05, 0.3, 1.0), (-0.3, -0.1, -2.0)], [(0.1, 0.5, 0.5), (0.3, 0.4, 1.5), (-0.1, 0.3, -1.0)]]
    logp, prox, beh, adv, mask = _tensors(rows, 4)
    loss, stats = ppo_policy_loss(logp, prox, beh, adv, mask, 0.2, 2.0, is_correction="sequence")
    exp_loss, exp_w, exp_trunc = brute_sequence_loss(rows, 0.2, 2.0)
    assert loss.item() == pytest.approx(exp_loss, rel=1e-12)
    assert stats["is_weight_mean"] == pytest.approx(exp_w, rel=1e-12)
    assert stats["is_truncated_frac"] == pytest.approx(exp_trunc) == 3 / 5
    assert exp_w == pytest.approx((2 * math.exp(0.2) + 3 * 2.0) / 5)

    # Gradient wrt log π_θ, by central differences of the brute-force loss, token by token.
    (grad,) = torch.autograd.grad(loss, logp)
    h = 1e-6
    for i, toks in enumerate(rows):
        for t in range(len(toks)):
            up = [list(r) for r in rows]
            dn = [list(r) for r in rows]
            up[i][t] = (toks[t][0] + h, *toks[t][1:])
            dn[i][t] = (toks[t][0] - h, *toks[t][1:])
            numeric = (brute_sequence_loss(up, 0.2, 2.0)[0] - brute_sequence_loss(dn, 0.2, 2.0)[0]) / (2 * h)
            assert grad[i, t].item() == pytest.approx(numeric, abs=1e-7)
    assert grad[0, 2:].abs().sum().item() == 0.0 and grad[1, 3].item() == 0.0


def test_sequence_level_long_row_does_not_overflow() -> None:
    # 200 tokens with log ρ = 1 each: Π ρ = e^200 overflows float32; clamped in log space, w = cap exactly.
    rows = [[(0.0, 1.0, 1.0)] * 200]
    logp, prox, beh, adv, mask = (x.float() if x.dtype == F64 else x for x in _tensors(rows, 200))
    loss, stats = ppo_policy_loss(logp.detach().requires_grad_(True), prox, beh, adv, mask, 0.2, 2.0,
                                  is_correction="sequence")
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(-2.0)  # w = 2, r = 1, A = 1 on every token
    assert stats["is_weight_mean"] == pytest.approx(2.0) and stats["is_truncated_frac"] == 1.0


def test_token_and_sequence_agree_on_one_token_rows() -> None:
    rows = [[(0.1, 0.4, 1.0)], [(-0.2, 0.9, -1.0)], [(0.0, -0.5, 2.0)]]
    a = ppo_policy_loss(*_tensors(rows, 1), 0.2, 2.0, is_correction="token")
    b = ppo_policy_loss(*_tensors(rows, 1), 0.2, 2.0, is_correction="sequence")
    assert a[0].item() == pytest.approx(b[0].item(), rel=1e-12)
    assert a[1]["is_truncated_frac"] == b[1]["is_truncated_frac"] == pytest.approx(1 / 3)


def test_unknown_is_correction_is_rejected() -> None:
    with pytest.raises(ValueError, match="is_correction"):
        ppo_policy_loss(*_tensors([[(0.0, 0.0, 1.0)]], 1), 0.2, 2.0, is_correction="tokens")


def test_kl_penalty_k3() -> None:
    # Tokens with log π_ref − log π_θ = d: k3 = e^d − d − 1. d = 0.5 → 0.148721; d = −0.2 → 0.018731.
    logp = torch.tensor([[-1.0, -2.0, -0.3]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-0.5, -2.2, 5.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=F64)
    kl = kl_penalty(logp, ref, mask)
    expected = ((math.exp(0.5) - 0.5 - 1) + (math.exp(-0.2) + 0.2 - 1)) / 2
    assert kl.item() == pytest.approx(expected, rel=1e-12)
    (grad,) = torch.autograd.grad(kl, logp)
    # d/dlogπ_θ of (e^d − d − 1) with d = ref − logπ_θ is (1 − e^d) / n_valid: pulls π_θ toward π_ref.
    assert grad[0].tolist() == pytest.approx([(1 - math.exp(0.5)) / 2, (1 - math.exp(-0.2)) / 2, 0.0])
    assert kl_penalty(ref, ref, mask).item() == 0.0


def test_entropy_from_logits() -> None:
    uniform = torch.zeros(2, 3, 50, dtype=F64)
    assert entropy_from_logits(uniform).flatten().tolist() == pytest.approx([math.log(50)] * 6)
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]], dtype=F64)
    z = [math.exp(x) for x in logits[0].tolist()]
    p = [x / sum(z) for x in z]
    assert entropy_from_logits(logits)[0].item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-6)
    peaked = torch.tensor([[0.0, 0.0, 200.0]])
    assert entropy_from_logits(peaked)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_no_correction_is_orz_ppo_loss_by_hand() -> None:
    """is_correction none: w = 1 whatever μ is. Worked by hand, ε = 0.2:
    token 1: log r = 0.1 → r = 1.10517 inside the clip range, A = 1: min = 1.10517;
    token 2: log r = 0.3 → r = 1.34986 > 1.2, A = 2: min(2.69972, 2.4) = 2.4;
    token 3: log r = −0.4 → r = 0.67032 < 0.8, A = −1: min(−0.67032, −0.8) = −0.8;
    L = −(1.10517 + 2.4 − 0.8) / 3."""
    rows = [[(0.1, 0.5, 1.0), (0.3, -0.2, 2.0)], [(-0.4, 0.1, -1.0)]]
    loss, stats = ppo_policy_loss(*_tensors(rows, 2), 0.2, 2.0, is_correction="none")
    assert loss.item() == pytest.approx(-(math.exp(0.1) + 2.4 - 0.8) / 3, rel=1e-12)
    assert stats["is_weight_mean"] == 1.0 and stats["is_truncated_frac"] == 0.0
    assert stats["behavior_kl"] > 0  # μ ≠ π_prox is still measured, only not corrected for
    token, _ = ppo_policy_loss(*_tensors(rows, 2), 0.2, 2.0, is_correction="token")
    assert token.item() != pytest.approx(loss.item())


def test_no_correction_at_staleness_zero_is_orz_loss_exactly() -> None:
    """ORZ's single policy step at staleness 0: π_θ = π_prox at the forward, so r = 1 and L = −mean(A), with
    gradient −A_t / n on each token's log-prob, whatever the generator's numerics made μ."""
    rows = [[(0.0, 0.013, 1.5), (0.0, -0.02, -0.5)], [(0.0, 0.004, 2.0)]]
    logp, prox, beh, adv, mask = _tensors(rows, 2)
    loss, _ = ppo_policy_loss(logp, logp.detach(), beh, adv, mask, 0.2, 2.0, is_correction="none")
    assert loss.item() == pytest.approx(-(1.5 - 0.5 + 2.0) / 3, rel=1e-14)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[mask.bool()].tolist() == pytest.approx([-1.5 / 3, 0.5 / 3, -2.0 / 3], rel=1e-14)
    corrected, _ = ppo_policy_loss(logp, logp.detach(), beh, adv, mask, 0.2, 2.0, is_correction="token")
    assert abs(corrected.item() - loss.item()) > 1e-4  # the weights differ from 1 by μ's numerics

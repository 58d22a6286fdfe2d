"""The decoupled-PPO policy loss and ORZ's clipped value loss, token-level over a padded batch.

Runs in the learner process only; pure tensor functions, no state. Formulas as in docs/architecture.md,
"The loss". Three policies meet here: μ, the behaviour policy that sampled
the tokens (`behavior_logprobs`, from the generator); π_prox, the learner's weights at the start of the
step (`proximal_logprobs`); π_θ, the policy being optimised (`logprobs`). All tensors are [B, T] on the
response grid of learner/batch.py; `mask` is 1 on valid response tokens and is read as 0/1. Every
per-token quantity is zeroed at masked positions *before* any exp or product, so whatever padding holds
(0, −inf, NaN) reaches neither the loss nor its gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from learner.masked import masked_mean


def _where_valid(x: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, x, torch.zeros_like(x))


def ppo_policy_loss(
    logprobs: Tensor,
    proximal_logprobs: Tensor,
    behavior_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    is_cap: float,
    is_correction: str = "token",
    clip_eps_high: float | None = None,
    agg: str = "token_mean",
    norm_tokens: int = 1,
    is_mode: str = "truncate",
    is_low: float | None = None,
    is_high: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Decoupled PPO (Hilton et al. 2021, "Batch size-invariance for policy optimization"; AReaL's
    decoupled PPO), as docs/architecture.md writes it:

        r_t = π_θ(a_t|s_t) / π_prox(a_t|s_t)                  the PPO ratio, clipped to [1−ε, 1+ε]
        w_t = min(π_prox(a_t|s_t) / μ(a_t|s_t), c)            truncated importance weight, no gradient
        L   = −mean_t[ w_t · min(r_t·A_t, clip(r_t, 1−ε, 1+ε)·A_t) ]

    The mean is over every valid token of the batch (token-level, as ORZ). With π_prox = μ (no staleness,
    matching numerics) w = 1 and this is ORZ's PPO loss.

    `clip_eps_high` (DAPO's clip-higher) replaces ε on the upper edge only: the ratio is clipped to
    [1 − clip_eps, 1 + clip_eps_high]. `agg` is how the per-token losses become one (`aggregate`).

    `is_mode="mask"` drops tokens (or samples) whose weight is outside [is_low, is_high] instead of capping
    them (`_masked_is`).

    `is_correction="none"` drops w (w = 1): exactly ORZ's PPO loss, right when there is no staleness
    (`max_staleness: 0`), where w differs from 1 only by the generator's and the learner's numerics.

    `is_correction="sequence"` uses one weight per sample instead, the truncated product of its token ratios
    (verl's "Rollout Correction" sequence TIS; SkyRL's sequence correction):
        w_i = min(Π_t π_prox(a_t|s_t) / μ(a_t|s_t), c)       applied to every token of sample i
    It is unbiased for sequence-level objectives but has far higher variance; the token level is the default.

    Stats (python floats, all means over valid tokens):
      policy_loss        L.
      clipfrac           fraction of tokens where the clipped branch is the strict minimum, i.e.
                         (r > 1+ε and A > 0) or (r < 1−ε and A < 0): exactly the tokens whose gradient
                         the clip zeroes. A = 0 or r on the bound counts as not clipped.
      approx_kl          mean of (r − 1) − log r, the k3 estimator (Schulman, "Approximating KL
                         divergence", 2020) of KL(π_prox ‖ π_θ); unbiased when the tokens come from π_prox.
      behavior_kl        mean of (ρ − 1) − log ρ with ρ = π_prox/μ: k3 over tokens sampled from μ, so it
                         estimates KL(μ ‖ π_prox), the off-policyness of the batch (0 when μ = π_prox).
      is_weight_mean     mean of w after truncation.
      is_truncated_frac  fraction of tokens where π_prox/μ > c (strictly), i.e. where w = c < π_prox/μ
                         (sequence level: tokens of samples whose product ratio exceeds c).
    """
    valid = mask.bool()
    # π_prox and μ are fixed snapshots: the gradient flows through π_θ alone, never through w.
    proximal_logprobs = proximal_logprobs.detach()
    behavior_logprobs = behavior_logprobs.detach()
    advantages = _where_valid(advantages.detach(), valid)
    log_ratio = _where_valid(logprobs - proximal_logprobs, valid)
    ratio = torch.exp(log_ratio)
    behavior_log_ratio = _where_valid(proximal_logprobs - behavior_logprobs, valid)
    behavior_ratio = torch.exp(behavior_log_ratio)
    masked = torch.zeros_like(behavior_ratio, dtype=torch.bool)
    if is_correction == "none":
        is_weight = torch.ones_like(behavior_ratio)
        truncated = torch.zeros_like(behavior_ratio, dtype=torch.bool)
    elif is_mode == "mask":
        is_weight, masked = _masked_is(behavior_log_ratio, valid, is_correction, is_cap, is_low, is_high)
        truncated = torch.zeros_like(behavior_ratio, dtype=torch.bool)
    elif is_correction == "token":
        is_weight = behavior_ratio.clamp(max=is_cap)
        truncated = behavior_ratio > is_cap
    elif is_correction == "sequence":
        seq_log_ratio = behavior_log_ratio.sum(dim=1, keepdim=True).expand_as(behavior_log_ratio)
        # Clamp in log space: a long sequence's product can overflow exp before the truncation.
        is_weight = _where_valid(torch.exp(seq_log_ratio.clamp(max=math.log(is_cap))), valid)
        truncated = seq_log_ratio > math.log(is_cap)
    else:
        raise ValueError(f"is_correction must be 'none', 'token' or 'sequence', got {is_correction!r}")

    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * advantages
    loss = aggregate(-is_weight * torch.min(unclipped, clipped), mask, agg, norm_tokens)

    with torch.no_grad():
        ratio_d = ratio.detach()
        clipped_on = ((ratio_d > 1.0 + high) & (advantages > 0)) | ((ratio_d < 1.0 - clip_eps) & (advantages < 0))
        stats = {
            "policy_loss": loss.item(),
            "clipfrac": masked_mean(clipped_on.float(), mask).item(),
            "approx_kl": masked_mean((ratio_d - 1.0) - log_ratio.detach(), mask).item(),
            "behavior_kl": masked_mean((behavior_ratio - 1.0) - behavior_log_ratio, mask).item(),
            "is_weight_mean": masked_mean(is_weight, mask).item(),
            "is_truncated_frac": masked_mean(truncated.float(), mask).item(),
            "is_masked_frac": masked_mean(masked.float(), mask).item(),
        }
    return loss, stats


MAX_LOG_WEIGHT = 20.0  # the sequence weight's log is clamped to ±this before exp: no overflow on long samples


def _masked_is(log_ratio: Tensor, valid: Tensor, level: str, is_cap: float, low: float | None,
               high: float | None) -> tuple[Tensor, Tensor]:
    """Masked importance sampling (`learner.is_mode: mask`): a token — or, at sequence level, every token of a
    sample — whose weight is outside [is_low, is_high] is dropped from the loss (weight 0, still counted in
    its normaliser) instead of capped; the others keep their weight uncapped. The token weight is π_prox/μ;
    the sequence weight is the geometric mean of the sample's token ratios (GSPO-style),
    exp(mean_t log(π_prox/μ)), its log clamped to ±MAX_LOG_WEIGHT. Bounds: is_high defaults to is_cap,
    is_low to 1 / is_high. Returns (weights, dropped)."""
    high = is_cap if high is None else high
    low = 1.0 / high if low is None else low
    if level == "token":
        weight = torch.exp(log_ratio)
    elif level == "sequence":
        mean_log = log_ratio.sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True).clamp(min=1)
        weight = torch.exp(mean_log.clamp(-MAX_LOG_WEIGHT, MAX_LOG_WEIGHT)).expand_as(log_ratio)
    else:
        raise ValueError(f"is_correction must be 'token' or 'sequence' with is_mode mask, got {level!r}")
    keep = (weight >= low) & (weight <= high) & valid
    return torch.where(keep, weight, torch.zeros_like(weight)), valid & ~keep


LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregate(per_token: Tensor, mask: Tensor, agg: str, norm_tokens: int = 1) -> Tensor:
    """One loss from per-token losses [B, T] over the valid tokens (`learner.loss_agg`):

        token_mean               Σ_i Σ_t l_it / Σ_i |y_i|        every token weighs the same (DAPO; ORZ)
        seq_mean_token_mean      (1/N) Σ_i (Σ_t l_it / |y_i|)     every sequence weighs the same (GRPO)
        seq_mean_token_sum_norm  (1/N) Σ_i Σ_t l_it / L          a constant L, no length bias (Dr. GRPO)

    N counts the sequences with at least one valid token; L is `norm_tokens` (the sampling max_tokens). The
    trainer weighs each micro-batch by its share of the step's tokens (token_mean) or sequences (the others),
    so the loss of a step is the same on 1 rank and on K.
    """
    valid = mask.bool()
    x = torch.where(valid, per_token, torch.zeros_like(per_token))
    if agg == "token_mean":
        return x.sum() / valid.sum().clamp(min=1)
    has = valid.any(dim=1)
    n = has.sum().clamp(min=1)
    if agg == "seq_mean_token_mean":
        return (x.sum(dim=1) / valid.sum(dim=1).clamp(min=1))[has].sum() / n
    if agg == "seq_mean_token_sum_norm":
        return x.sum(dim=1)[has].sum() / norm_tokens / n
    raise ValueError(f"loss_agg must be one of {', '.join(LOSS_AGGS)}, got {agg!r}")


def kl_penalty(logprobs: Tensor, reference_logprobs: Tensor, mask: Tensor) -> Tensor:
    """The k3 estimate of KL(π_θ ‖ π_ref) per token, averaged over valid tokens (GRPO's KL term,
    DeepSeekMath eq. 4): exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1 ≥ 0. Off by default: ORZ trains
    without any KL term (`learner.kl_coef = 0`), and then no reference model is even loaded.
    """
    valid = mask.bool()
    delta = _where_valid(reference_logprobs.detach() - logprobs, valid)
    return masked_mean(torch.exp(delta) - delta - 1.0, mask)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H(π(·|s)) = logsumexp(z) − Σ softmax(z)·z per position, over the last (vocabulary) dim."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, value_clip: float
) -> tuple[Tensor, dict[str, float]]:
    """ORZ's clipped value loss (from OpenRLHF's `ValueLoss`; docs/architecture.md's L_v):

        V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
        L_v    = ½ · mean_t[ max((V − R)², (V_clip − R)²) ]

    token-level mean over valid tokens. Stats: `value_loss` (L_v) and `value_clipfrac`, the fraction of
    valid tokens where the clipped term is strictly the larger, i.e. where the clip decides the loss and
    the token's gradient wrt V is zero.
    """
    valid = mask.bool()
    values = _where_valid(values, valid)
    old_values = _where_valid(old_values, valid)
    returns = _where_valid(returns, valid)

    values_clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_sq, clipped_sq), mask)

    with torch.no_grad():
        stats = {
            "value_loss": loss.item(),
            "value_clipfrac": masked_mean((clipped_sq > unclipped_sq).float(), mask).item(),
        }
    return loss, stats


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 − Var[R − V] / Var[R] over valid tokens (population variances), a 0-dim tensor.

    1 is a perfect critic, 0 one no better than predicting the batch mean, negative worse than that.
    When Var[R] = 0 (e.g. ORZ's γ = λ = 1 with every reward in the batch equal, since then R_t = r_T) the
    quantity is undefined and NaN is returned, as CleanRL does.
    """
    valid = mask.bool()
    values = _where_valid(values, valid)
    returns = _where_valid(returns, valid)
    residual = returns - values
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    if var_returns.item() == 0.0:
        return torch.tensor(float("nan"), dtype=var_returns.dtype, device=var_returns.device)
    return 1.0 - var_residual / var_returns

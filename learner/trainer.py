"""One PPO-GAE iteration on a batch of trajectory groups (ORZ's schedule, decoupled-PPO loss).

Order of work (ARCHITECTURE.md, "Data flow", step 5):
1. Old values V_old from the critic, and proximal log-probs π_prox from the actor at the step's starting
   weights (no grad).
2. GAE advantages and returns (γ = λ = 1 by default), then batch-level advantage whitening (ORZ).
3. `policy_steps_per_iter` actor optimiser steps (ORZ: 1), each accumulating gradients over micro-batches,
   with the token-level loss of learner/loss.py normalised by the batch's total response tokens.
4. `critic_steps_per_iter` critic optimiser steps (ORZ: 12) with the clipped value loss.

With one policy step the actor's first forward *is* the proximal forward (π_θ = π_prox there), so its
detached log-probs serve as π_prox and one full forward pass is saved.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch import nn

from learner.batch import RolloutBatch, microbatches
from learner.critic import Critic
from learner.gae import compute_gae, masked_mean, masked_whiten
from learner.loss import explained_variance, ppo_policy_loss, value_loss
from services.config import LearnerConfig


def token_logprobs(model: nn.Module, mb: RolloutBatch) -> torch.Tensor:
    """log π(a_t|s_t) on the response grid [B, T]."""
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    targets = mb.input_ids[:, 1:]
    per_pos = torch.gather(logp, 2, targets.unsqueeze(-1)).squeeze(-1)  # [B, L-1]
    return torch.gather(per_pos, 1, mb.response_index)


def token_values(critic: Critic, mb: RolloutBatch) -> torch.Tensor:
    """V(s_t) on the response grid: the value at the position that predicts response token t."""
    return torch.gather(critic(mb.input_ids, mb.attention_mask), 1, mb.response_index)


def _warmup_constant(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


class PPOTrainer:
    def __init__(self, cfg: LearnerConfig, actor: nn.Module, critic: Critic, max_tokens_per_microbatch: int) -> None:
        self.cfg = cfg
        self.actor = actor
        self.critic = critic
        self.max_tokens = max_tokens_per_microbatch
        self.actor_opt = torch.optim.AdamW(actor.parameters(), lr=cfg.actor_lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        self.critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, betas=cfg.betas,
                                            weight_decay=cfg.weight_decay)
        # ORZ: linear warm-up, then constant.
        self.actor_sched = torch.optim.lr_scheduler.LambdaLR(self.actor_opt, _warmup_constant(cfg.warmup_steps))
        self.critic_sched = torch.optim.lr_scheduler.LambdaLR(self.critic_opt, _warmup_constant(cfg.warmup_steps))

    def step(self, batch: RolloutBatch) -> dict[str, float]:
        cfg = self.cfg
        timings: dict[str, float] = {}
        t0 = time.time()
        mbs = microbatches(batch, self.max_tokens)
        n_tokens = float(batch.response_mask.sum())
        old_values = torch.zeros_like(batch.response_mask)
        proximal = torch.zeros_like(batch.response_mask)
        self.actor.eval()
        self.critic.eval()
        with torch.no_grad():
            for rows in mbs:
                mb = batch.select(rows)
                old_values[rows, : mb.response_mask.shape[1]] = token_values(self.critic, mb) * mb.response_mask
                if cfg.policy_steps_per_iter > 1:
                    proximal[rows, : mb.response_mask.shape[1]] = token_logprobs(self.actor, mb) * mb.response_mask
        timings["forward_s"] = time.time() - t0

        advantages, returns = compute_gae(batch.rewards, old_values, batch.response_mask, cfg.gamma, cfg.lam)
        if cfg.normalize_advantages:
            advantages = masked_whiten(advantages, batch.response_mask)

        t1 = time.time()
        stats: dict[str, float] = defaultdict(float)
        self.actor.train()
        for _ in range(cfg.policy_steps_per_iter):
            self.actor_opt.zero_grad(set_to_none=True)
            for rows in mbs:
                mb = batch.select(rows)
                width = mb.response_mask.shape[1]
                logprobs = token_logprobs(self.actor, mb)
                prox = logprobs.detach() if cfg.policy_steps_per_iter == 1 else proximal[rows, :width]
                loss, st = ppo_policy_loss(logprobs, prox, mb.behavior_logprobs, advantages[rows, :width],
                                           mb.response_mask, cfg.clip_eps, cfg.is_cap)
                weight = float(mb.response_mask.sum()) / n_tokens  # token-level mean over the whole batch
                (loss * weight).backward()
                for k, v in st.items():
                    stats[k] += v * weight / cfg.policy_steps_per_iter
            grad_norm = torch.nn.utils.clip_grad_norm_(self.actor.parameters(), cfg.grad_clip)
            stats["actor_grad_norm"] += float(grad_norm) / cfg.policy_steps_per_iter
            self.actor_opt.step()
        self.actor_sched.step()

        self.critic.train()
        for _ in range(cfg.critic_steps_per_iter):
            self.critic_opt.zero_grad(set_to_none=True)
            for rows in mbs:
                mb = batch.select(rows)
                width = mb.response_mask.shape[1]
                values = token_values(self.critic, mb)
                loss, st = value_loss(values, old_values[rows, :width], returns[rows, :width], mb.response_mask,
                                      cfg.value_clip)
                weight = float(mb.response_mask.sum()) / n_tokens
                (loss * weight).backward()
                for k, v in st.items():
                    stats[k] += v * weight / cfg.critic_steps_per_iter
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.grad_clip)
            self.critic_opt.step()
        self.critic_sched.step()
        timings["backward_s"] = time.time() - t1

        stats["explained_variance"] = float(explained_variance(old_values, returns, batch.response_mask))
        stats["advantage_mean"] = float(masked_mean(advantages, batch.response_mask))
        stats["value_mean"] = float(masked_mean(old_values, batch.response_mask))
        stats["actor_lr"] = self.actor_sched.get_last_lr()[0]
        stats["critic_lr"] = self.critic_sched.get_last_lr()[0]
        stats["microbatches"] = float(len(mbs))
        stats.update(timings)
        return dict(stats)

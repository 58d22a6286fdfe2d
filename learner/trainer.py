"""One PPO iteration on a batch of trajectory groups (ORZ's schedule, decoupled-PPO loss), on one rank or
data-parallel across ranks.

Order of work (docs/architecture.md, "One step", 5):
1. Old values V_old from the critic, proximal log-probs π_prox from the actor at the step's starting weights,
   and reference log-probs when a KL term is on (all without grad).
2. Advantages: GAE (γ = λ = 1 by default, ORZ) with returns for the critic, or GRPO / RLOO from the group's
   outcome rewards (no critic); then batch-level advantage whitening (ORZ, `normalize_advantages`).
3. `policy_steps_per_iter` actor optimiser steps (ORZ: 1), each accumulating gradients over micro-batches of
   at most `max_tokens_per_microbatch` padded tokens, with the token-level loss of learner/loss.py
   normalised by the batch's total response tokens.
4. `critic_steps_per_iter` critic optimiser steps (ORZ: 12) with the clipped value loss (GAE only).
Each learning-rate schedule (linear warm-up over `warmup_steps`, then constant) advances once per step of its
own optimiser, as ORZ's does: the critic warms up in `warmup_steps` critic steps, not iterations.

With one policy step the actor's first forward *is* the proximal forward (π_θ = π_prox at that moment, same
weights and inputs, no dropout), so its detached log-probs serve as π_prox and a full forward pass is saved.

Data parallel (learner/parallel.py): every rank holds whole groups of the batch (GRPO/RLOO statistics stay
local) and its models are FSDP2-sharded; token counts and whitening statistics are summed across ranks, so
the loss is the token mean over the *global* batch. FSDP averages gradients over ranks, hence the loss is
scaled by the world size. Every rank runs the same number of micro-batches (the longest rank's count; spare
ones re-run a local micro-batch with weight 0) because each forward and backward is a collective.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn

from learner import checkpoint as ckpt
from learner import parallel
from learner.advantages import grpo_advantages, rloo_advantages
from learner.batch import RolloutBatch, microbatches, pack
from learner.critic import Critic
from learner.gae import compute_gae
from learner.logits import ChunkedHead
from learner.loss import entropy_from_logits, explained_variance, kl_penalty, ppo_policy_loss, value_loss
from learner.masked import masked_mean
from learner.minibatch import assign
from learner.parallel import DataParallel
from learner.shaping import overlong_penalty
from services.config import LearnerConfig


def token_logprobs(model: nn.Module, mb: RolloutBatch, with_entropy: bool = False, packed: bool = False,
                   temperature: float = 1.0):
    """log π(a_t|s_t) on the response grid [B, T] (and the policy's entropy there, when asked), in fp32 at least,
    of the distribution the generator sampled from: softmax(logits / `temperature`).

    With a `ChunkedHead` (learner.logits_chunk_tokens > 0) only the response positions get logits, a chunk at
    a time (learner/logits.py); otherwise the head's full [B, L, vocab] logits are built. `packed`: the
    micro-batch runs as one padding-free row (learner/batch.py)."""
    grid = mb.response_index.shape
    if packed:
        p = pack(mb)
        inputs, index = {"input_ids": p.input_ids, "position_ids": p.position_ids}, p.response_index
        mask = mb.response_mask.reshape(1, -1)
    else:
        inputs = {"input_ids": mb.input_ids, "attention_mask": mb.attention_mask}
        index, mask = mb.response_index, mb.response_mask
    ids = inputs["input_ids"]
    head = model.get_output_embeddings()
    if isinstance(head, ChunkedHead):
        targets = ids.gather(1, index + 1)  # the response token each position predicts
        with head.gather(index, targets, mask, with_entropy, temperature) as request:
            logp = model(**inputs, use_cache=False).logits
        out, entropy = logp, request.entropy
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        if logits.dtype in (torch.float16, torch.bfloat16):  # log-softmax in fp32 at least (fp64 models stay fp64)
            logits = logits.float()
        if temperature != 1.0:
            logits = logits / temperature
        logp = torch.log_softmax(logits, dim=-1)
        per_pos = torch.gather(logp, 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, L-1]
        out = torch.gather(per_pos, 1, index)
        entropy = torch.gather(entropy_from_logits(logits), 1, index) if with_entropy else None
    out = out.reshape(grid)
    return (out, entropy.reshape(grid)) if with_entropy else out


def token_values(critic: Critic, mb: RolloutBatch, packed: bool = False) -> torch.Tensor:
    """V(s_t) on the response grid: the value at the position that predicts response token t (fp32 at least)."""
    if packed:
        p = pack(mb)
        values = critic(p.input_ids, None, p.position_ids).gather(1, p.response_index).reshape(mb.response_index.shape)
    else:
        values = torch.gather(critic(mb.input_ids, mb.attention_mask), 1, mb.response_index)
    return values.float() if values.dtype in (torch.float16, torch.bfloat16) else values


def lr_factor(warmup_steps: int, decay_iterations: int = 0, final_fraction: float = 1.0, steps_per_iter: int = 1):
    """The learning-rate multiplier at optimiser step k (from 0): linear warm-up over `warmup_steps` optimiser
    steps (ORZ: 50, then constant); then, with `decay_iterations`, a linear decay to `final_fraction` over that
    many iterations of `steps_per_iter` optimiser steps each (ORZ-32B's annealing stage: 1e-6 to 3e-7 in 100)."""
    def factor(k: int) -> float:
        if k < warmup_steps:
            return (k + 1) / warmup_steps
        if decay_iterations <= 0:
            return 1.0
        done = min(1.0, (k - warmup_steps) / (steps_per_iter * decay_iterations))
        return 1.0 - (1.0 - final_fraction) * done
    return factor


def _scalar(x) -> float:
    """A float from a tensor, a DTensor (FSDP2's grad norm) or a number."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


class PPOTrainer:
    """Owns the optimisers and schedules of actor and critic; `step()` runs one iteration on a batch shard.

    `critic` is None for the critic-free estimators (grpo, rloo); `reference` is the frozen base policy,
    needed only when `kl_coef > 0`. `group` is the data-parallel process group (None: a single process).
    """

    def __init__(self, cfg: LearnerConfig, actor: nn.Module, critic: Critic | None,
                 reference: nn.Module | None = None, group: dist.ProcessGroup | None = None,
                 temperature: float = 1.0, max_tokens: int | None = None) -> None:
        """`temperature`: the generators' sampling temperature (sampling.temperature); the log-probs of π_θ,
        π_prox and π_ref are those of softmax(logits / temperature), as vLLM's μ is. `max_tokens`: the
        sampling cap (sampling.max_tokens), for overlong shaping and Dr. GRPO's constant normaliser."""
        if temperature <= 0:
            raise ValueError(f"sampling temperature must be > 0 for training, got {temperature}")
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        if (cfg.overlong_buffer_tokens or cfg.loss_agg == "seq_mean_token_sum_norm") and max_tokens is None:
            raise ValueError("overlong shaping and loss_agg seq_mean_token_sum_norm need the sampling max_tokens")
        if cfg.advantage == "gae" and critic is None:
            raise ValueError("advantage 'gae' needs a critic")
        if cfg.kl_coef > 0 and reference is None:
            raise ValueError("kl_coef > 0 needs a reference model")
        self.cfg = cfg
        self.actor = actor
        self.critic = critic
        self.reference = reference
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.device = next(actor.parameters()).device
        self.actor_opt = torch.optim.AdamW(actor.parameters(), lr=cfg.actor_lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        # ORZ: linear warm-up, then constant (or a linear decay: learner.lr_decay_iterations)
        decay = (cfg.lr_decay_iterations, cfg.lr_final_fraction)
        self.actor_sched = torch.optim.lr_scheduler.LambdaLR(
            self.actor_opt, lr_factor(cfg.warmup_steps, *decay, cfg.policy_steps_per_iter))
        self.critic_opt = self.critic_sched = None
        if critic is not None:
            self.critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, betas=cfg.betas,
                                                weight_decay=cfg.weight_decay)
            self.critic_sched = torch.optim.lr_scheduler.LambdaLR(
                self.critic_opt, lr_factor(cfg.warmup_steps, *decay, cfg.critic_steps_per_iter))

    def _logprobs(self, model: nn.Module, mb: RolloutBatch) -> torch.Tensor:
        return token_logprobs(model, mb, packed=self.cfg.packing, temperature=self.temperature)

    # -- cross-rank reductions (identity on one process) --------------------------------------------------
    def _sum(self, values: list[float]) -> list[float]:
        if self.group is None:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.tolist()

    def _max(self, value: int) -> int:
        if self.group is None:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t)

    def _whiten(self, x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """learner/masked.py's `masked_whiten` over the global batch: one mean and population variance over every
        valid token on every rank (ORZ's `normalize_advantages`)."""
        valid = mask.bool()
        xs = torch.where(valid, x, torch.zeros_like(x)).double()
        total, count = self._sum([float(xs.sum()), float(valid.sum())])
        mean = total / max(count, 1.0)
        (sq,) = self._sum([float(torch.where(valid, (xs - mean) ** 2, torch.zeros_like(xs)).sum())])
        var = sq / max(count, 1.0)
        out = (x - mean) / max(var, eps) ** 0.5
        return torch.where(valid, out, torch.zeros_like(out))

    def _schedule(self, batch: RolloutBatch) -> list[tuple[torch.Tensor, float]]:
        """(rows, weight) per micro-batch; every rank gets the same count, spare ones have weight 0."""
        mbs = microbatches(batch, self.cfg.max_tokens_per_microbatch, self.cfg.packing)
        n = self._max(len(mbs))
        return [(rows, 1.0) for rows in mbs] + [(mbs[-1], 0.0)] * (n - len(mbs))

    def _steps(self, batch: RolloutBatch, n: int, whole: list[tuple[torch.Tensor, float]], n_tokens: float,
               units=None) -> list[tuple[list[tuple[torch.Tensor, float]], float]]:
        """The `n` optimiser steps of one model: each one's micro-batches and the global response tokens it
        covers (or the global `units(rows)`: what the loss averages over, tokens or sequences). ORZ's: the
        batch's samples shuffled and dealt into `n` mini-batches balanced by tokens, the same on 1 rank and on
        K (learner/minibatch.py), at most one pass; `step_over: batch`: every step over the whole batch."""
        if self.cfg.step_over == "batch" or n == 1:
            return [(whole, n_tokens)] * n
        seed = self.cfg.seed * 7919 + self.actor_sched.last_epoch  # a fresh shuffle every iteration, resumable
        which, count = assign(batch.sample_keys, batch.seq_lens, n, seed, self.group)
        which = which.to(batch.seq_lens.device)
        out = []
        for m in range(count):
            rows = (which == m).nonzero().squeeze(1)
            mbs = microbatches(batch, self.cfg.max_tokens_per_microbatch, self.cfg.packing, rows) if len(rows) else []
            spare = mbs[-1] if mbs else torch.zeros(1, dtype=torch.long, device=rows.device)  # weight 0: collectives
            schedule = [(r, 1.0) for r in mbs] + [(spare, 0.0)] * (self._max(len(mbs)) - len(mbs))
            (tokens,) = self._sum([units(rows) if units is not None else float(batch.response_mask[rows].sum())])
            out.append((schedule, tokens))
        return out

    def state_dict(self, dp: DataParallel) -> dict:
        """What a checkpoint holds besides the models: the optimiser states in full (gathered from every rank
        when sharded: a collective, every rank calls it), the schedules and the RNG states."""
        state = {"actor_opt": parallel.optimizer_state(self.actor, self.actor_opt, dp),
                 "actor_sched": self.actor_sched.state_dict(), "rng": ckpt.rng_state()}
        if self.critic_opt is not None:
            state["critic_opt"] = parallel.optimizer_state(self.critic, self.critic_opt, dp)
            state["critic_sched"] = self.critic_sched.state_dict()
        return state

    def load_state_dict(self, state: dict | None, dp: DataParallel, schedules: dict) -> None:
        """Inverse of `state_dict`. `state`: on rank 0 (None on the others, which receive the optimiser
        states from it); `schedules`: a state holding the schedules and RNG states, on every rank."""
        parallel.load_optimizer_state(self.actor, self.actor_opt, state and state["actor_opt"], dp)
        if self.critic_opt is not None:
            parallel.load_optimizer_state(self.critic, self.critic_opt, state and state["critic_opt"], dp)
        self.actor_sched.load_state_dict(schedules["actor_sched"])
        if self.critic_sched is not None:
            self.critic_sched.load_state_dict(schedules["critic_sched"])
        ckpt.set_rng_state(schedules["rng"])

    def step(self, batch: RolloutBatch) -> dict[str, float]:
        cfg = self.cfg
        timings: dict[str, float] = {}
        t0 = time.time()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        batch = batch.to(self.device)
        schedule = self._schedule(batch)
        local_tokens = float(batch.response_mask.sum())
        (n_tokens,) = self._sum([local_tokens])
        mask = batch.response_mask
        dtype = next(self.actor.parameters()).dtype  # the models' precision (fp32 here; fp64 in tests)
        old_values = torch.zeros(mask.shape, dtype=dtype, device=self.device)
        proximal = torch.zeros(mask.shape, dtype=dtype, device=self.device)
        reference = torch.zeros(mask.shape, dtype=dtype, device=self.device)
        need_prox = cfg.policy_steps_per_iter > 1
        self.actor.eval()
        if self.critic is not None:
            self.critic.eval()
        first_pass = self.critic is not None or need_prox or self.reference is not None
        with torch.no_grad():
            for rows, _ in schedule if first_pass else []:
                mb = batch.select(rows)
                width = mb.response_mask.shape[1]
                if self.critic is not None:
                    old_values[rows, :width] = token_values(self.critic, mb, cfg.packing) * mb.response_mask
                if need_prox:
                    proximal[rows, :width] = self._logprobs(self.actor, mb) * mb.response_mask
                if self.reference is not None:
                    reference[rows, :width] = self._logprobs(self.reference, mb) * mb.response_mask
        timings["forward_s"] = time.time() - t0

        returns = None
        rewards = batch.rewards.to(dtype)
        if cfg.overlong_buffer_tokens:  # DAPO's soft overlong punishment, on each sample's last token
            lens = mask.sum(dim=1)
            shaped = overlong_penalty(lens, self.max_tokens, cfg.overlong_buffer_tokens, cfg.overlong_penalty)
            last = (lens - 1).clamp(min=0).long()
            rewards = rewards.clone()
            rewards[torch.arange(len(lens), device=rewards.device), last] += shaped.to(dtype) * (lens > 0)
        if cfg.advantage == "gae":
            advantages, returns = compute_gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        elif cfg.advantage == "grpo":
            advantages = grpo_advantages(rewards, mask, batch.group_of, cfg.grpo_scale_by_std)
        else:
            advantages = rloo_advantages(rewards, mask, batch.group_of)
        raw_adv_mean = masked_mean(advantages, mask)
        if cfg.normalize_advantages:
            advantages = self._whiten(advantages, mask)

        t1 = time.time()
        stats: dict[str, float] = defaultdict(float)
        lrs: dict[str, float] = {}  # the learning rate of each model's last optimiser step (the same on every rank)
        with_entropy = cfg.entropy_coef > 0
        self.actor.train()
        # The policy loss's tokens (truncated samples left out with mask_truncated: DAPO's overlong filtering) and
        # what it averages over: tokens, or sequences (loss_agg).
        policy_mask = mask * (~batch.truncated).to(mask.dtype)[:, None] if cfg.mask_truncated else mask

        def policy_units(rows: torch.Tensor) -> float:
            m = policy_mask[rows]
            return float(m.sum()) if cfg.loss_agg == "token_mean" else float((m.sum(dim=1) > 0).sum())

        (n_units,) = self._sum([policy_units(torch.arange(batch.size, device=mask.device))])
        policy_steps = self._steps(batch, cfg.policy_steps_per_iter, schedule, n_units, policy_units)
        for step_schedule, step_units in policy_steps:
            self.actor_opt.zero_grad(set_to_none=True)
            scale = self.world / max(step_units, 1.0)  # loss · world (FSDP averages gradients) / the step's units
            # The diagnostics (KL, IS fractions, entropy) are token means whatever the loss averages over.
            if cfg.loss_agg == "token_mean":  # the units are the tokens: no second reduction
                token_scale = scale
            else:
                (step_tokens,) = self._sum([sum(use * float(policy_mask[rows].sum()) for rows, use in step_schedule)])
                token_scale = self.world / max(step_tokens, 1.0)
            for rows, use in step_schedule:
                mb = batch.select(rows)
                width = mb.response_mask.shape[1]
                out = token_logprobs(self.actor, mb, with_entropy, cfg.packing, self.temperature)
                logprobs, entropy = out if with_entropy else (out, None)
                prox = proximal[rows, :width] if need_prox else logprobs.detach()
                clip_low, clip_high = cfg.clip_edges
                loss, st = ppo_policy_loss(logprobs, prox, mb.behavior_logprobs, advantages[rows, :width],
                                           policy_mask[rows, :width], clip_low, cfg.is_cap, cfg.is_weight,
                                           clip_high, cfg.loss_agg, self.max_tokens or 1, cfg.is_mode,
                                           cfg.is_low, cfg.is_high)
                if self.reference is not None:
                    kl = kl_penalty(logprobs, reference[rows, :width], mb.response_mask)
                    loss = loss + cfg.kl_coef * kl
                    st["kl_ref"] = kl.item()
                if entropy is not None:
                    ent = masked_mean(entropy, mb.response_mask)
                    loss = loss - cfg.entropy_coef * ent
                    st["entropy"] = ent.item()
                weight = use * policy_units(rows) * scale
                (loss * weight).backward()
                token_weight = use * float(policy_mask[rows].sum()) * token_scale
                for k, v in st.items():
                    stats[k] += v * (weight if k == "policy_loss" else token_weight) / self.world / len(policy_steps)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.actor.parameters(), cfg.grad_clip)
            stats["actor_grad_norm"] += _scalar(grad_norm) / len(policy_steps) / self.world
            lrs["actor_lr"] = self.actor_opt.param_groups[0]["lr"]  # the last step's
            self.actor_opt.step()
            self.actor_sched.step()  # per optimiser step, as ORZ's warm-up counts

        if self.critic is not None:
            self.critic.train()
            critic_steps = self._steps(batch, cfg.critic_steps_per_iter, schedule, n_tokens)
            for step_schedule, step_tokens in critic_steps:
                self.critic_opt.zero_grad(set_to_none=True)
                scale = self.world / step_tokens
                for rows, use in step_schedule:
                    mb = batch.select(rows)
                    width = mb.response_mask.shape[1]
                    values = token_values(self.critic, mb, cfg.packing)
                    loss, st = value_loss(values, old_values[rows, :width], returns[rows, :width],
                                          mb.response_mask, cfg.value_clip)
                    weight = use * float(mb.response_mask.sum()) * scale
                    (loss * weight).backward()
                    for k, v in st.items():
                        stats[k] += v * weight / self.world / len(critic_steps)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.grad_clip)
                stats["critic_grad_norm"] += _scalar(grad_norm) / len(critic_steps) / self.world
                lrs["critic_lr"] = self.critic_opt.param_groups[0]["lr"]
                self.critic_opt.step()
                self.critic_sched.step()
        timings["backward_s"] = time.time() - t1

        # Token-weighted per-rank sums → global means (each rank added weight-scaled values above).
        keys = sorted(stats)
        stats = dict(zip(keys, self._sum([stats[k] for k in keys]), strict=True))
        local = [float(raw_adv_mean) * local_tokens]
        if self.critic is not None:
            local += [float(masked_mean(old_values, mask)) * local_tokens]
        summed = self._sum(local)
        stats["advantage_mean"] = summed[0] / n_tokens
        if self.critic is not None:
            stats["value_mean"] = summed[1] / n_tokens
            # Explained variance of this rank's shard (the mean over ranks when data parallel).
            (ev,) = self._sum([float(explained_variance(old_values, returns, mask))])
            stats["explained_variance"] = ev / self.world
        stats.update(lrs)
        stats["microbatches"] = float(len(schedule))
        stats["tokens"] = n_tokens
        # Of the token slots the micro-batches computed (rows × padded width), the share that was padding.
        slots = sum(int(batch.seq_lens[rows].sum()) if cfg.packing else len(rows) * int(batch.seq_lens[rows].max())
                    for rows, use in schedule if use)
        real, slots = self._sum([float(batch.seq_lens.sum()), float(slots)])
        stats["padded_fraction"] = 1.0 - real / max(slots, 1.0)
        if self.device.type == "cuda":
            stats["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        stats.update(timings)
        return stats

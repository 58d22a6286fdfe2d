"""Learner throughput: a full PPO iteration against bare forward/backward passes on the same tokens.

Both sides run in the same process, on the same random Qwen2 actor and critic, on the same batch:
- `ppo`: `PPOTrainer.step` — critic value pass (and proximal pass when policy_steps_per_iter > 1), GAE,
  advantage whitening, `policy_steps_per_iter` actor updates with the decoupled-PPO loss and
  `critic_steps_per_iter` critic updates with the clipped value loss, micro-batched by token budget.
- `bare`: the same number of passes done the plainest way — `model(ids).logits.sum().backward()` and an
  optimiser step per update, no gather, no loss terms, no statistics.
The ratio `ppo_s / bare_s` is the overhead of the learner's bookkeeping (goal ≤ 1.25). Prints JSON.

    python bench/learner_throughput.py --hidden 256 --layers 4 --prompts 16 --samples 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

# This file is named like the `learner` package it measures; keep its own folder off the import path.
import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

from learner.batch import build_batch
from learner.critic import Critic
from learner.trainer import PPOTrainer
from services.config import LearnerConfig
from services.protocol import Sample, TrajectoryGroup


def make_models(args: argparse.Namespace) -> tuple[Qwen2ForCausalLM, Critic, Qwen2Config]:
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    actor = Qwen2ForCausalLM(cfg)
    critic = Critic(Qwen2Model(cfg), cfg.hidden_size)
    return actor, critic, cfg


def make_groups(args: argparse.Namespace) -> list[TrajectoryGroup]:
    rng = np.random.default_rng(0)
    groups = []
    for g in range(args.prompts):
        prompt = rng.integers(3, args.vocab, args.prompt_len).astype(np.int32)
        samples = []
        for _ in range(args.samples):
            t = int(rng.integers(args.response_len // 2, args.response_len + 1))
            ids = rng.integers(3, args.vocab, t).astype(np.int32)
            samples.append(Sample(ids, np.full(t, -np.log(args.vocab), dtype=np.float32),
                                  float(rng.random() < 0.4), "stop", ""))
        groups.append(TrajectoryGroup(f"t{g}", prompt, tuple(samples), 0, "bench"))
    return groups


def bare_iteration(actor, critic, actor_opt, critic_opt, batch, lc: LearnerConfig) -> None:
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        critic(ids, mask)
        if lc.policy_steps_per_iter > 1:
            actor(input_ids=ids, attention_mask=mask)
    for _ in range(lc.policy_steps_per_iter):
        actor_opt.zero_grad(set_to_none=True)
        actor(input_ids=ids, attention_mask=mask).logits.sum().backward()
        actor_opt.step()
    for _ in range(lc.critic_steps_per_iter):
        critic_opt.zero_grad(set_to_none=True)
        critic(ids, mask).sum().backward()
        critic_opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--response-len", type=int, default=64)
    ap.add_argument("--critic-steps", type=int, default=12, help="ORZ: 12")
    ap.add_argument("--policy-steps", type=int, default=1, help="ORZ: 1")
    ap.add_argument("--max-tokens-per-microbatch", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lc = LearnerConfig(actor_lr=1e-5, critic_lr=1e-5, warmup_steps=1, critic_steps_per_iter=args.critic_steps,
                       policy_steps_per_iter=args.policy_steps,
                       max_tokens_per_microbatch=args.max_tokens_per_microbatch,
                       step_over="batch")  # every step over the whole batch, as the bare baseline passes
    batch = build_batch(make_groups(args), pad_id=0)
    tokens = int(batch.attention_mask.sum())
    actor, critic, _ = make_models(args)
    trainer = PPOTrainer(lc, actor, critic)
    actor_opt = torch.optim.AdamW(actor.parameters(), lr=1e-5, betas=lc.betas)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=1e-5, betas=lc.betas)

    trainer.step(batch)  # warm-up of both paths (allocator, optimiser state)
    bare_iteration(actor, critic, actor_opt, critic_opt, batch, lc)
    ppo_times, bare_times = [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits both sides alike
        t0 = time.perf_counter()
        trainer.step(batch)
        ppo_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bare_iteration(actor, critic, actor_opt, critic_opt, batch, lc)
        bare_times.append(time.perf_counter() - t0)
    ppo_s, bare_s = statistics.median(ppo_times), statistics.median(bare_times)
    print(json.dumps({
        "benchmark": "learner_ppo_iteration",
        "params_actor": sum(p.numel() for p in actor.parameters()),
        "sequences": batch.size, "tokens": tokens,
        "response_tokens": int(batch.response_mask.sum()),
        "policy_steps": args.policy_steps, "critic_steps": args.critic_steps, "threads": args.threads,
        "ppo_s": round(ppo_s, 4), "bare_s": round(bare_s, 4),
        "ppo_tokens_per_s": round(tokens / ppo_s, 1), "bare_tokens_per_s": round(tokens / bare_s, 1),
        "overhead_ratio": round(ppo_s / bare_s, 3), "goal_ratio": 1.25,
        "ppo_times": [round(t, 4) for t in ppo_times], "bare_times": [round(t, 4) for t in bare_times],
    }, indent=1))


if __name__ == "__main__":
    main()

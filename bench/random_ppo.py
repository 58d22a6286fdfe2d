"""Random-init Qwen2 actor and critic of a given shape, and a padded PPO batch of given lengths: real PPO
iterations without a download, for bench/learner_memory.py and bench/gpu_check.py."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

from learner.batch import RolloutBatch, build_batch
from learner.critic import Critic
from services.memplan import ModelShape
from services.protocol import Sample, TrajectoryGroup


def qwen2_config(s: ModelShape, max_positions: int = 4096) -> Qwen2Config:
    return Qwen2Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                       num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                       max_position_embeddings=max(4096, max_positions), tie_word_embeddings=s.tied)


def models(s: ModelShape, max_positions: int = 4096, device: str | torch.device = "cpu",
           seed: int = 0) -> tuple[Qwen2ForCausalLM, Critic]:
    """fp32 actor and critic, initialised on `device` (no host copy of a GPU-sized model)."""
    cfg = qwen2_config(s, max_positions)
    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen2ForCausalLM(cfg), Critic(Qwen2Model(cfg), s.hidden)


def lengths(rows: int, width: int) -> list[tuple[int, int]]:
    """(prompt, response) per sequence: the first fills the width, the others are shorter (padding)."""
    prompt = max(4, width // 8)
    return [(prompt, width - (k * width) // (2 * rows) - prompt) for k in range(rows)]


def batch(s: ModelShape, sizes: list[tuple[int, int]], seed: int = 0) -> RolloutBatch:
    """Random tokens, behaviour log-probs of -8 (about uniform over a large vocabulary), rewards 0 and 1."""
    rng = np.random.default_rng(seed)
    groups = []
    for k, (p, r) in enumerate(sizes):
        sample = Sample(rng.integers(1, s.vocab, size=r).astype(np.int32), np.full(r, -8.0, np.float32), float(k % 2),
                        "stop", "")
        groups.append(TrajectoryGroup(f"t{k}", rng.integers(1, s.vocab, size=p).astype(np.int32), (sample,), 0, "g"))
    return build_batch(groups, pad_id=0)

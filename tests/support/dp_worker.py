"""Two PPO iterations on a fixed batch, on one process or as one rank of `torchrun` (test_data_parallel.py).

Builds the same seeded float64 Qwen2 actor and critic and the same seeded trajectory groups on every rank, so
the single-process and data-parallel runs start from identical state. The groups carry behaviour log-probs
that differ from the learner's (as after `max_staleness > 0`), rewards in {0, 1}, and lengths that need
several micro-batches. Rank 0 writes the updated weights (safetensors) and per-iteration stats (JSON) to
the directory given as argv[1]; argv[2] is the advantage estimator; argv[3], optional, a comma-separated list
of learner features to turn on: `checkpointing` (activation checkpointing per decoder layer), `chunked`
(log-probs from the final hidden states in chunks of 5 positions, learner/logits.py), `bf16` (fp32 master
weights, bf16 compute through FSDP2's mixed precision, also on one process), `packed` (padding-free
micro-batches, learner/batch.py), `epochs` (every optimiser step over the whole batch instead of ORZ's
mini-batches), and the DAPO family: `seqmean` / `drgrpo` (loss_agg seq_mean_token_mean /
seq_mean_token_sum_norm), `cliphigh` (clip_eps_high 0.28), `overlong` (a 4-token overlong buffer before
max_tokens 12), `masktrunc` (the 11-token samples marked truncated and left out of the policy loss). The
models are made ready by
learner/models.py, as a learner rank makes them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

from learner import parallel
from learner.batch import build_batch
from learner.critic import Critic
from learner.logits import ChunkedHead
from learner.models import prepare
from learner.trainer import PPOTrainer
from services.config import LearnerConfig
from services.protocol import Sample, TrajectoryGroup

VOCAB = 64
MAX_TOKENS = 12  # the samples' lengths are 1..11


def make_models() -> tuple[Qwen2ForCausalLM, Critic]:
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    actor = Qwen2ForCausalLM(cfg).to(torch.float64)
    torch.manual_seed(1)
    backbone = Qwen2Model(cfg).to(torch.float64)
    critic = Critic(backbone, cfg.hidden_size).to(torch.float64)
    return actor, critic


def make_groups(n_groups: int = 6, n_samples: int = 4) -> list[TrajectoryGroup]:
    rng = np.random.default_rng(7)
    groups = []
    for g in range(n_groups):
        prompt = rng.integers(1, VOCAB, size=int(rng.integers(2, 7))).astype(np.int32)
        samples = []
        for _ in range(n_samples):
            n = int(rng.integers(1, 12))
            ids = rng.integers(1, VOCAB, size=n).astype(np.int32)
            # μ's log-probs near a uniform policy's log(1/64) ≈ −4.16, perturbed: π_prox/μ ≠ 1, some above the cap.
            lps = (np.log(1 / VOCAB) + rng.normal(0, 0.8, size=n)).clip(max=-1e-3).astype(np.float32)
            samples.append(Sample(ids, lps, float(rng.integers(0, 2)), "stop", ""))
        groups.append(TrajectoryGroup(f"t{g}", prompt, tuple(samples), 0, "g"))
    return groups


def main() -> None:
    out = Path(sys.argv[1])
    advantage = sys.argv[2]
    features = set(filter(None, (sys.argv[3] if len(sys.argv) > 3 else "").split(",")))
    torch.set_num_threads(1)
    bf16 = "bf16" in features
    dp = parallel.init_from_env(mixed_precision=bf16)
    actor, critic = make_models()
    if bf16:
        actor, critic = actor.float(), critic.float()
    if advantage != "gae":
        critic = None
    cfg = LearnerConfig(advantage=advantage, actor_lr=1e-3, critic_lr=1e-3, warmup_steps=1, critic_steps_per_iter=3,
                        is_cap=1.5, max_tokens_per_microbatch=40, logits_chunk_tokens=5 if "chunked" in features else 0,
                        activation_checkpointing="checkpointing" in features, packing="packed" in features,
                        step_over="batch" if "epochs" in features else "minibatches",
                        loss_agg={"seqmean": "seq_mean_token_mean", "drgrpo": "seq_mean_token_sum_norm"}.get(
                            next((f for f in features if f in ("seqmean", "drgrpo")), ""), "token_mean"),
                        clip_eps_high=0.28 if "cliphigh" in features else None,
                        overlong_buffer_tokens=4 if "overlong" in features else 0,
                        mask_truncated="masktrunc" in features)
    prepare(cfg, dp, actor, critic)  # as every learner rank does (learner/models.py)
    compute_dtypes: set[str] = set()
    if dp.sharded:  # the dtype the first decoder layer computes in
        parallel.decoder_layers(actor)[0].register_forward_hook(
            lambda mod, args, out: compute_dtypes.add(str((out[0] if isinstance(out, tuple) else out).dtype)))
    trainer = PPOTrainer(cfg, actor, critic, None, dp.group if dp.enabled else None, max_tokens=MAX_TOKENS)
    groups = make_groups()
    if "masktrunc" in features:  # the longest samples hit the cap
        groups = [TrajectoryGroup(g.task_id, g.prompt_ids, tuple(
            Sample(s.response_ids, s.logprobs, s.reward, "length" if len(s.response_ids) == 11 else s.finish_reason,
                   s.text) for s in g.samples), g.policy_version, g.generator_id) for g in groups]
    share = parallel.split_groups(groups, dp.world)[dp.rank]
    batch = build_batch([groups[i] for i in share], pad_id=0)
    history = [trainer.step(batch) for _ in range(2)]
    actor_state = parallel.full_state_dict(actor, dp)
    critic_state = parallel.full_state_dict(critic, dp) if critic is not None else {}
    if dp.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in actor_state.items()}, str(out / "actor.safetensors"))
        if critic_state:
            save_file({k: v.contiguous() for k, v in critic_state.items()}, str(out / "critic.safetensors"))
        active = {"chunked": isinstance(actor.get_output_embeddings(), ChunkedHead),
                  "checkpointing": bool(actor.is_gradient_checkpointing)}
        if bf16:
            active["compute_dtypes"] = sorted(compute_dtypes)
            active["master_dtypes"] = sorted({str(p.dtype) for p in actor.parameters()})
            active["adam_state_dtypes"] = sorted({str(v.dtype) for st in trainer.actor_opt.state.values()
                                                  for v in st.values() if torch.is_tensor(v) and v.dim() > 0})
        (out / "stats.json").write_text(json.dumps({"world": dp.world, "shares": len(share), "history": history,
                                                    "active": active}))
    parallel.close(dp)
    parallel.end_process(dp)


if __name__ == "__main__":
    main()

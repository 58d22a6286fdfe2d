"""Actor, critic and reference made ready to train, as every learner rank makes them (learner/main.py), and as
the benchmarks of learner memory and of GPUs (bench/learner_memory.py, bench/gpu_check.py) make theirs."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from learner import parallel
from learner.logits import install_chunked_head
from services.config import LearnerConfig


def prepare(lc: LearnerConfig, dp: parallel.DataParallel, actor: nn.Module, critic: nn.Module | None = None,
            reference: nn.Module | None = None) -> None:
    """In place: the chunked log-prob head (no [tokens × vocab] logits, learner/logits.py), activation
    checkpointing per decoder layer, the rank's device, and FSDP2 sharding (bf16 mixed precision when `dp` says)."""
    for model in (actor, reference):
        if model is not None and lc.logits_chunk_tokens > 0:
            install_chunked_head(model, lc.logits_chunk_tokens)
    if lc.activation_checkpointing:  # recomputed in the backward pass
        for body in (actor, critic.backbone if critic is not None else None):
            if body is not None:
                body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for model in (actor, critic, reference):
        if model is not None:
            model.to(dp.device)  # the rank's GPU when there is one (FSDP2 shards from there)
            if dp.sharded:
                parallel.shard(model, mixed_precision=dp.mixed_precision)


def critic_source(base: Path, resume_from: Path | None = None) -> Path:
    """Where the critic comes from: the checkpoint being resumed; else the base model's `critic/` when the base
    model is itself a checkpoint of an earlier run (ORZ-32B's annealing stage starts from the main run's);
    else the base model, whose transformer gets a fresh value head."""
    if resume_from is not None:
        return resume_from / "critic"
    return base / "critic" if (base / "critic" / "config.json").is_file() else base

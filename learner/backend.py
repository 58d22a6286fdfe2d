"""The learner's models and what is done to them: the part of the learner that the simulation replaces.

`Learner` (learner/main.py) drives a backend: it feeds it each step's groups, asks it for the weights to
broadcast, and for what a checkpoint holds. `TorchBackend` is the real one — actor, critic, optional
reference, the PPO trainer, FSDP2 when there are several ranks. learner/sim.py's `CostBackend` sleeps for a
cost model's time instead, with everything around it (Redis, the feeder, intake, weight sync) real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner import checkpoint as ckpt
from learner import parallel
from learner.batch import build_batch
from learner.critic import Critic
from learner.models import critic_source, prepare
from learner.trainer import PPOTrainer
from services.config import Config
from services.control import ControlPlane
from services.membership import WeightGroup
from services.protocol import TrajectoryGroup


class Backend(Protocol):
    tokenizer: Any  # encodes prompts for the feeder, decodes them for the samples table; `pad_token_id`

    @property
    def vocab_size(self) -> int: ...

    def train(self, groups: list[TrajectoryGroup]) -> dict:
        """One PPO iteration on this rank's groups; the step's stats."""

    def actor_state(self) -> dict[str, torch.Tensor]:
        """The actor's full weights (every rank calls it: a collective when sharded)."""

    def final_states(self) -> tuple[dict, dict | None]:
        """Full actor and critic states at the end (every rank)."""

    def checkpoint_state(self) -> tuple[dict | None, dict | None]:
        """(trainer state, critic state) for a checkpoint (every rank); None where there is none."""

    def save_models(self, path: Path, actor_state: dict, critic_state: dict | None) -> None:
        """Writes Hugging Face model directories (rank 0)."""

    def weight_group(self, cfg: Config, control: ControlPlane, on_slow) -> WeightGroup:
        """The weight-sync group for this model's parameter names and shapes."""

    def step_fields(self) -> dict:
        """Extra fields for each step's record."""


class TorchBackend:
    def __init__(self, cfg: Config, dp: parallel.DataParallel, resume_from: Path | None) -> None:
        """Actor (from the base model or the resumed checkpoint), critic, reference, trainer and tokenizer."""
        lc = cfg.learner
        self.dp = dp
        base = cfg.model.path
        if not (base / "config.json").exists():
            raise FileNotFoundError(f"no base model at {base}: run `orz make-base-model --config ...` first")
        start = resume_from or base
        self.tokenizer = AutoTokenizer.from_pretrained(str(base))
        attn = lc.attn_implementation
        self.actor = AutoModelForCausalLM.from_pretrained(str(start), dtype=torch.float32, attn_implementation=attn)
        self.critic = None
        if lc.advantage == "gae":  # GRPO and RLOO need no critic (learner/advantages.py)
            self.critic = Critic.from_pretrained(critic_source(base, resume_from), attn)
        self.reference = None
        if lc.kl_coef > 0:
            self.reference = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32,
                                                                  attn_implementation=attn).eval()
            self.reference.requires_grad_(False)
        prepare(lc, dp, self.actor, self.critic, self.reference)
        self.trainer = PPOTrainer(lc, self.actor, self.critic, self.reference, dp.group if dp.enabled else None,
                                  cfg.sampling.temperature, cfg.sampling.max_tokens)
        if resume_from is not None:
            state = ckpt.load_trainer(resume_from) if dp.is_main else None
            # Schedules and RNG states are tiny: with several ranks every rank reads them from the file.
            self.trainer.load_state_dict(state, dp, ckpt.load_trainer(resume_from) if dp.enabled else state)

    @property
    def vocab_size(self) -> int:
        return int(self.actor.config.vocab_size)

    def train(self, groups: list[TrajectoryGroup]) -> dict:
        if self.dp.enabled:
            groups = [groups[i] for i in parallel.split_groups(groups, self.dp.world)[self.dp.rank]]
        return self.trainer.step(build_batch(groups, self.tokenizer.pad_token_id))

    def actor_state(self) -> dict[str, torch.Tensor]:
        return parallel.full_state_dict(self.actor, self.dp)

    def _critic_state(self) -> dict | None:
        return parallel.full_state_dict(self.critic, self.dp) if self.critic is not None else None

    def final_states(self) -> tuple[dict, dict | None]:
        critic = self._critic_state()
        return self.actor_state(), critic

    def checkpoint_state(self) -> tuple[dict | None, dict | None]:
        trainer_state = self.trainer.state_dict(self.dp)
        return trainer_state, self._critic_state()

    def save_models(self, path: Path, actor_state: dict, critic_state: dict | None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.actor.save_pretrained(path, state_dict=actor_state, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        if self.critic is not None:
            self.critic.save_pretrained(path / "critic", state_dict=critic_state)

    def weight_group(self, cfg: Config, control: ControlPlane, on_slow) -> WeightGroup:
        # Global shapes without a gather: a DTensor's `shape` is the unsharded one.
        names, shapes = zip(*[(n, tuple(p.shape)) for n, p in self.actor.state_dict().items()])
        return WeightGroup(cfg, control, tuple(names), tuple(shapes), on_slow=on_slow)

    def step_fields(self) -> dict:
        return {}

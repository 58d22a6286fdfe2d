"""The learner with its GPU work replaced by a cost model, for the cluster-scale simulation (bench/simulate.py).

Everything else is the real `Learner` loop: the feeder and its admission control, reading and validating
TrajectoryGroups from Redis, staleness drops, version bumps, the weight-sync group with live membership
(a real gloo group carrying a small stand-in tensor), acks, metrics.jsonl. The training step sleeps for
`CostModel.train_s(tokens)` × time_scale; a broadcast that was sent is followed by a sleep for the modelled
NCCL broadcast of the real model's weights. Each step's record also carries the CPU seconds this process and
Redis spent since the previous one: the orchestration overhead, since sleeping costs no CPU.
"""

from __future__ import annotations

import time

import torch

from learner.main import Learner
from services.config import Config
from services.control import ControlPlane
from services.costmodel import CostModel
from services.membership import WeightGroup
from services.protocol import TrajectoryGroup

STAND_IN = {"model.stand_in": torch.zeros(1024)}  # what travels over the real weight-sync group


class PromptTokens:
    """The feeder's tokenizer: every prompt is `prompt_len` tokens (the simulation's prompt length)."""

    pad_token_id = 0

    def __init__(self, prompt_len: int) -> None:
        self.prompt_len = prompt_len

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1 + (hash(text) + i) % 1000 for i in range(self.prompt_len)]

    def decode(self, ids) -> str:  # the samples table's prompt column
        return f"<{len(ids)} simulated prompt tokens>"


class _SimWeightGroup(WeightGroup):
    def __init__(self, *args, cost: CostModel, time_scale: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cost, self.scale = cost, time_scale

    def sync(self, version: int, state: dict[str, torch.Tensor]) -> float | None:
        sent = super().sync(version, state)
        if sent is None:
            return None
        time.sleep(self.cost.broadcast_s() * self.scale)
        return sent + self.cost.broadcast_s() * self.scale


class CostBackend:
    """`learner.backend.Backend` with the GPU work replaced by the cost model's time."""

    def __init__(self, cost: CostModel, time_scale: float, prompt_len: int, train_gpus: int | None = None) -> None:
        self.cost, self.scale = cost, time_scale
        self.train_gpus = train_gpus or cost.train_gpus
        self.tokenizer = PromptTokens(prompt_len)
        self.vocab_size = 2**31 - 1  # the cost models' token ids are placeholders
        self.control: ControlPlane | None = None
        self._cpu_mark: tuple[float, float] | None = None

    def train(self, groups: list[TrajectoryGroup]) -> dict:
        tokens = sum(len(g.prompt_ids) + len(s.response_ids) for g in groups for s in g.samples)
        seconds = self.cost.train_s(tokens, self.train_gpus)
        time.sleep(seconds * self.scale)
        return {"simulated_train_s": seconds, "tokens": tokens}

    def actor_state(self) -> dict[str, torch.Tensor]:
        return STAND_IN

    def final_states(self) -> tuple[dict, None]:
        return STAND_IN, None

    def checkpoint_state(self) -> tuple[None, None]:
        return None, None

    def save_models(self, path, actor_state, critic_state) -> None:
        return None

    def weight_group(self, cfg: Config, control: ControlPlane, on_slow) -> WeightGroup:
        self.control = control
        names, shapes = zip(*[(n, tuple(t.shape)) for n, t in STAND_IN.items()])
        return _SimWeightGroup(cfg, control, tuple(names), tuple(shapes), cost=self.cost, time_scale=self.scale,
                               on_slow=on_slow)

    def step_fields(self) -> dict:
        """The CPU seconds this process and Redis spent since the previous step: the orchestration overhead."""
        assert self.control is not None
        now = time.process_time(), self.control.server_cpu_s()
        fields = {}
        if self._cpu_mark is not None:
            fields = {"learner_cpu_s": now[0] - self._cpu_mark[0], "redis_cpu_s": now[1] - self._cpu_mark[1]}
        self._cpu_mark = now
        return fields


def sim_learner(cfg: Config, cost: CostModel, time_scale: float, prompt_len: int,
                train_gpus: int | None = None) -> Learner:
    """The real `Learner` loop over a `CostBackend`."""
    return Learner(cfg, backend=CostBackend(cost, time_scale, prompt_len, train_gpus))

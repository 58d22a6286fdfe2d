"""The learner with its GPU work replaced by a cost model, for the cluster-scale simulation (bench/simulate.py).

Everything else is the real `Learner` loop: the feeder and its admission control, reading and validating
TrajectoryGroups from Redis, staleness drops, version bumps, the weight-sync group with live membership
(a real gloo group carrying a small stand-in tensor), acks, metrics.jsonl. The training step sleeps for
`CostModel.train_s(tokens)` × time_scale; a broadcast that was sent is followed by a sleep for the modelled
NCCL broadcast of the real model's weights. Each step's record also carries the CPU seconds this process and
Redis spent since the previous one: the orchestration overhead, since sleeping costs no CPU.
"""

from __future__ import annotations

import threading
import time

import torch

from learner import parallel
from learner.main import Learner
from services.config import Config
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


class SimLearner(Learner):
    def __init__(self, cfg: Config, cost: CostModel, time_scale: float, prompt_len: int,
                 train_gpus: int | None = None) -> None:
        self.cfg = cfg
        self.cost, self.scale = cost, time_scale
        self.train_gpus = train_gpus or cost.train_gpus
        self.dp = parallel.init_from_env()
        self.run_path = cfg.run_path
        self.ckpt_root = self.run_path / "checkpoints"
        self.stop_event = threading.Event()
        self.version = self.step = 0
        self.resume_from = self.resume_state = None
        self.tokenizer = PromptTokens(prompt_len)
        self.actor = self.critic = self.reference = self.trainer = None
        self._cpu_mark: tuple[float, float] | None = None
        self._init_rank0()

    def _train(self, groups: list[TrajectoryGroup]) -> dict:
        tokens = sum(len(g.prompt_ids) + len(s.response_ids) for g in groups for s in g.samples)
        seconds = self.cost.train_s(tokens, self.train_gpus)
        time.sleep(seconds * self.scale)
        return {"simulated_train_s": seconds, "tokens": tokens}

    def _actor_state(self) -> dict[str, torch.Tensor]:
        return STAND_IN

    def _vocab_size(self) -> int:
        return 2**31 - 1  # the cost models' token ids are placeholders

    def _weight_group(self) -> WeightGroup:
        names, shapes = zip(*[(n, tuple(t.shape)) for n, t in STAND_IN.items()])
        return _SimWeightGroup(self.cfg, self.control, tuple(names), tuple(shapes), cost=self.cost,
                               time_scale=self.scale)

    def _final_states(self) -> tuple[dict, None]:
        return STAND_IN, None

    def _save_models(self, path, actor_state, critic_state) -> None:
        return None

    def _cpu(self) -> tuple[float, float]:
        return time.process_time(), self.control.server_cpu_s()

    def _record(self, *args, **kwargs) -> dict:
        record = super()._record(*args, **kwargs)
        now = self._cpu()
        if self._cpu_mark is not None:
            record["learner_cpu_s"] = now[0] - self._cpu_mark[0]
            record["redis_cpu_s"] = now[1] - self._cpu_mark[1]
        self._cpu_mark = now
        return record

"""One YAML file configures every process; `ORZ__SECTION__KEY` environment variables override it.

Shared by all processes (services/ imports none of the process packages). Defaults follow ORZ
(../shared/notes/anchors.md §e): γ = λ = 1, ε = 0.2, value clip 0.2, grad clip 1.0, no KL, AdamW
β = (0.9, 0.95), actor lr 1e-6, critic lr 5e-6, 12 critic steps per iteration, temperature 1.0,
stop at `</answer>`. `configs/tiny.yaml` scales them to a CPU-sized run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

ENV_PREFIX = "ORZ__"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    base_path: str = Field("~/.cache/orz/tiny-arith-base", description="HF-format base model directory")
    vocab_size: int = Field(384, description="tokenizer vocabulary built by make-base-model")
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 3
    num_heads: int = 2
    num_kv_heads: int = 1
    pretrain_steps: int = Field(800, description="supervised steps on the toy task's noisy traces")
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    answer_correct_prob: float = Field(
        0.3, description="fraction of pretraining traces whose final answer is right (the base model's prior)"
    )
    seed: int = 0

    @property
    def path(self) -> Path:
        return Path(os.path.expanduser(self.base_path))


class TaskConfig(_Section):
    kind: Literal["toy_arith"] = "toy_arith"
    seed: int = 1234
    min_terms: int = 2
    max_terms: int = 3
    max_operand: int = 9
    eval_size: int = Field(200, description="held-out problems for the accuracy report")
    task_type: str = "math"


class SamplingConfig(_Section):
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    stop: list[str] = Field(default_factory=lambda: ["</answer>"])


class RedisConfig(_Section):
    url: str | None = Field(None, description="redis://host:port/db; null starts an embedded redis-server")
    claim_idle_ms: int = Field(60_000, description="pending entries idle this long are reclaimed (XAUTOCLAIM)")
    block_ms: int = 1000
    socket_timeout_s: float = 10.0


class RewardConfig(_Section):
    url: str | None = Field(None, description="reward server base URL; `orz up` fills it in")
    host: str = "127.0.0.1"
    port: int = 8600
    grader_procs: int = 2
    grade_timeout_s: float = Field(5.0, description="wall-clock limit per item; the worker is killed past it")
    worker_mem_mb: int = Field(2048, description="RLIMIT_AS per grading worker")
    max_items: int = 1024
    max_response_chars: int = 200_000
    max_reference_chars: int = 10_000
    request_timeout_s: float = Field(60.0, description="client-side HTTP timeout")
    token: str | None = Field(None, description="bearer token required when set")


class GeneratorConfig(_Section):
    num: int = Field(2, description="generators started by `orz up`")
    backend: Literal["vllm"] = "vllm"
    prompts_per_batch: int = Field(8, description="prompts taken from the queue per engine call")
    dtype: str = "float32"
    kv_cache_mb: int = 64
    max_model_len: int = 256
    threads: int = 1
    seed: int = 0
    heartbeat_s: float = 2.0
    metrics_port: int = Field(0, description="0 picks a free port")


class LearnerConfig(_Section):
    total_steps: int = 40
    batch_prompts: int = 16
    n_samples: int = 8
    max_staleness: int = 1
    max_inflight_prompts: int | None = Field(
        None, description="default batch_prompts × (max_staleness + 1) (AReaL's admission rule)"
    )
    advantage: Literal["gae"] = "gae"
    gamma: float = 1.0
    lam: float = 1.0
    normalize_advantages: bool = True
    clip_eps: float = 0.2
    value_clip: float = 0.2
    is_cap: float = 2.0
    actor_lr: float = 1e-6
    critic_lr: float = 5e-6
    warmup_steps: int = 50
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    policy_steps_per_iter: int = 1
    critic_steps_per_iter: int = 12
    seed: int = 0
    threads: int = 1
    metrics_port: int = Field(0, description="0 picks a free port")
    wait_timeout_s: float = Field(600.0, description="give up if no trajectory arrives for this long")


class WeightSyncConfig(_Section):
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    host: str = "127.0.0.1"
    port: int = Field(0, description="rendezvous port; 0 lets the learner pick a free one")
    bucket_mb: int = 256
    timeout_s: float = 600.0


class EvalConfig(_Section):
    temperature: float = Field(1.0, description="ORZ reports accuracy averaged over samples at temperature 1")
    samples: int = Field(4, description="samples per held-out problem (avg@k)")
    max_tokens: int = 64


class Config(_Section):
    run_name: str = "tiny"
    run_dir: str = "runs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.learner.max_staleness < 0:
            raise ValueError("learner.max_staleness must be >= 0")
        if self.learner.batch_prompts < 1 or self.learner.n_samples < 1:
            raise ValueError("learner.batch_prompts and learner.n_samples must be >= 1")
        return self

    @property
    def namespace(self) -> str:
        return f"orz:{self.run_name}"

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) / self.run_name

    @property
    def max_inflight_prompts(self) -> int:
        lc = self.learner
        return lc.max_inflight_prompts or lc.batch_prompts * (lc.max_staleness + 1)


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """`ORZ__LEARNER__TOTAL_STEPS=5` → {"learner": {"total_steps": 5}}; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        _set_path(tree, path, yaml.safe_load(raw) if raw != "" else None)
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """YAML file, then environment (`ORZ__…`), then explicit overrides (CLI flags); later wins."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    data = _merge(data, env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    return Config.model_validate(data)


def config_to_env(cfg: Config) -> dict[str, str]:
    """The whole config as `ORZ__…` variables, so a child process sees exactly the parent's settings."""
    env: dict[str, str] = {}

    def walk(prefix: list[str], value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(prefix + [k], v)
        else:
            env[ENV_PREFIX + "__".join(p.upper() for p in prefix)] = yaml.safe_dump(
                value, default_flow_style=True, width=1 << 20
            ).strip().removesuffix("...").strip()

    walk([], cfg.model_dump(mode="json"))
    return env

"""The ORZ recipes carry ORZ's published settings (paper and playground/orz_*_ppo.py) and are consistent."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.config import load_config
from services.datasets import template

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("recipe", ["orz-7b", "orz-32b"])
def test_recipe_has_orz_settings(recipe: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml", environ={})
    lc, s = cfg.learner, cfg.sampling
    assert (lc.batch_prompts, lc.n_samples) == (128, 64)
    assert (lc.actor_lr, lc.critic_lr, lc.warmup_steps) == (1e-6, 5e-6, 50)
    assert (lc.advantage, lc.gamma, lc.lam, lc.clip_eps, lc.kl_coef, lc.entropy_coef) == ("gae", 1.0, 1.0, 0.2, 0, 0)
    assert (lc.policy_steps_per_iter, lc.critic_steps_per_iter) == (1, 12)
    assert (s.temperature, s.top_p, s.max_tokens) == (1.0, 1.0, 8000)
    assert s.stop == ["User:", "Human:", "Assistant:", "</answer>"]
    assert cfg.task.kind == "dataset" and cfg.task.format == "orz" and cfg.task.max_prompt_tokens == 2048
    assert cfg.task.train_files and all(f.endswith(".json") for f in cfg.task.train_files)
    assert template(cfg.task.template).endswith("Assistant: <think>")
    assert cfg.generator.max_model_len >= cfg.task.max_prompt_tokens + s.max_tokens
    assert cfg.eval.samples == 16 and cfg.eval.max_tokens == s.max_tokens
    assert 0 <= lc.max_staleness <= 4  # AReaL: decoupled PPO holds accuracy up to staleness 4
    assert cfg.weight_sync.backend == "nccl" and cfg.generator.dtype == "bfloat16"
    assert lc.num_processes > 1 and cfg.generator.num > 1

"""The ORZ recipes carry ORZ's published settings (paper and playground/orz_*_ppo.py) and are consistent."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.config_io import load_config
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
    assert cfg.generator.max_model_len == 8192  # ORZ caps prompt + response at 8,192
    assert cfg.eval.samples == 16 and cfg.eval.max_tokens == s.max_tokens
    assert 0 <= lc.max_staleness <= 4  # AReaL: decoupled PPO holds accuracy up to staleness 4
    assert cfg.weight_sync.backend == "nccl" and cfg.generator.dtype == "bfloat16"
    assert lc.num_processes > 1 and cfg.generator.num > 1


def test_critic_source(tmp_path) -> None:
    from learner.models import critic_source

    base = tmp_path / "Qwen2.5-32B"
    base.mkdir()
    assert critic_source(base) == base  # a base model: its transformer, a fresh value head
    step = tmp_path / "step-001100"
    (step / "critic").mkdir(parents=True)
    (step / "critic" / "config.json").write_text("{}")
    assert critic_source(step) == step / "critic"  # a checkpoint as the base model brings its trained critic
    assert critic_source(base, resume_from=step) == step / "critic"


def test_anneal_recipe_continues_the_32b_run() -> None:
    """ORZ-32B's last stage: 100 steps on the 13k hard collection, lr decayed linearly to 3e-7 (ORZ's README),
    from the main run's final checkpoint; everything else is the main recipe."""
    main = load_config(ROOT / "configs" / "orz-32b.yaml", environ={})
    anneal = load_config(ROOT / "configs" / "orz-32b-anneal.yaml", environ={})
    assert anneal.model.base_path == f"{main.run_dir}/{main.run_name}/checkpoints/step-{main.learner.total_steps:06d}"
    assert anneal.task.train_files == ["/data/orz/orz_math_13k_collection_hard.json"]
    lc = anneal.learner
    assert (lc.total_steps, lc.warmup_steps, lc.lr_decay_iterations) == (100, 0, 100)
    assert lc.actor_lr * lc.lr_final_fraction == pytest.approx(3e-7)
    assert main.learner.total_steps % main.learner.checkpoint_every == 0  # that checkpoint is written
    differ = {"run_name", "model", "task", "learner"}
    a, m = anneal.model_dump(), main.model_dump()
    assert {k for k in a if a[k] != m[k]} == differ
    assert {k for k in a["learner"] if a["learner"][k] != m["learner"][k]} == {
        "total_steps", "warmup_steps", "lr_decay_iterations", "lr_final_fraction"}
    assert {k for k in a["task"] if a["task"][k] != m["task"][k]} == {"train_files"}

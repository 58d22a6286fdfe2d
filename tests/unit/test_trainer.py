"""PPOTrainer's configurations on a small float64 model: each estimator and loss option runs, reports what it
did, and changes the weights; the single-policy-step shortcut for π_prox equals an explicit proximal pass."""

from __future__ import annotations

import copy

import pytest
import torch

from learner.batch import build_batch
from learner.trainer import PPOTrainer
from services.config import LearnerConfig
from tests.integration.dp_worker import make_groups, make_models


def _run(**overrides) -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    actor, critic = make_models()
    start = copy.deepcopy(actor)
    cfg = LearnerConfig(actor_lr=1e-3, critic_lr=1e-3, warmup_steps=1, critic_steps_per_iter=2, is_cap=1.5,
                        max_tokens_per_microbatch=60, **overrides)
    reference = copy.deepcopy(actor).requires_grad_(False) if cfg.kl_coef > 0 else None
    trainer = PPOTrainer(cfg, actor, critic if cfg.advantage == "gae" else None, reference)
    stats = trainer.step(build_batch(make_groups(), pad_id=0))
    return stats, start, actor


def _moved(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("overrides", [
    {"advantage": "gae"}, {"advantage": "grpo"}, {"advantage": "rloo"},
    {"advantage": "grpo", "grpo_scale_by_std": False}, {"is_correction": "sequence"},
    {"kl_coef": 0.1}, {"entropy_coef": 0.01}, {"policy_steps_per_iter": 2},
])
def test_configurations_train(overrides: dict) -> None:
    stats, start, actor = _run(**overrides)
    assert _moved(start, actor) > 1e-5
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["microbatches"] > 1 and stats["tokens"] > 0
    assert ("value_loss" in stats) == (overrides.get("advantage", "gae") == "gae")
    assert ("kl_ref" in stats) == ("kl_coef" in overrides)
    assert ("entropy" in stats) == ("entropy_coef" in overrides)
    if "kl_coef" in overrides:
        assert stats["kl_ref"] == pytest.approx(0.0, abs=1e-12)  # π_θ = π_ref before the first update
    if "entropy_coef" in overrides:
        assert 0 < stats["entropy"] <= torch.log(torch.tensor(64.0)).item() + 1e-9
    if overrides.get("policy_steps_per_iter") == 2:
        assert stats["approx_kl"] > 0  # the second step's ratio is against the recomputed π_prox
    else:
        assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-12)  # one step: π_θ = π_prox at the forward
    assert 0 < stats["is_truncated_frac"] < 1


def test_one_policy_step_shortcut_equals_explicit_proximal_pass() -> None:
    """With one policy step the trainer uses the detached first forward as π_prox; the update must equal one
    computed with an explicit π_prox pass (forced by running 2 steps and comparing after the first)."""
    _, _, shortcut = _run(policy_steps_per_iter=1, advantage="grpo")
    actor, _ = make_models()
    cfg = LearnerConfig(actor_lr=1e-3, warmup_steps=1, is_cap=1.5, max_tokens_per_microbatch=60,
                        advantage="grpo", policy_steps_per_iter=2)
    trainer = PPOTrainer(cfg, actor, None)
    steps = []
    original = trainer.actor_opt.step

    def capture(*a, **k):
        out = original(*a, **k)
        steps.append(copy.deepcopy(actor.state_dict()))
        return out

    trainer.actor_opt.step = capture
    trainer.step(build_batch(make_groups(), pad_id=0))
    for k, v in shortcut.state_dict().items():
        assert torch.allclose(v, steps[0][k], atol=1e-12), k


def test_gae_needs_a_critic_and_kl_a_reference() -> None:
    actor, _ = make_models()
    with pytest.raises(ValueError, match="critic"):
        PPOTrainer(LearnerConfig(advantage="gae"), actor, None)
    with pytest.raises(ValueError, match="reference"):
        PPOTrainer(LearnerConfig(advantage="grpo", kl_coef=0.1), actor, None)


def test_learning_rates_advance_per_optimiser_step() -> None:
    """ORZ's warm-up counts optimiser steps: with warmup_steps 5, 4 critic steps and 2 policy steps per
    iteration, the k-th step of each optimiser (from 0) uses lr × min(1, (k + 1) / 5), worked by hand below."""
    actor, critic = make_models()
    cfg = LearnerConfig(actor_lr=1e-3, critic_lr=2e-3, warmup_steps=5, critic_steps_per_iter=4,
                        policy_steps_per_iter=2, max_tokens_per_microbatch=60)
    trainer = PPOTrainer(cfg, actor, critic, None)
    seen: dict[str, list[float]] = {"actor": [], "critic": []}
    for name, opt in (("actor", trainer.actor_opt), ("critic", trainer.critic_opt)):
        opt.register_step_pre_hook(lambda o, args, kwargs, name=name: seen[name].append(o.param_groups[0]["lr"]))
    batch = build_batch(make_groups(), pad_id=0)
    reported = [trainer.step(batch) for _ in range(3)]
    assert seen["critic"] == pytest.approx([2e-3 * f for f in (0.2, 0.4, 0.6, 0.8, 1, 1, 1, 1, 1, 1, 1, 1)])
    assert seen["actor"] == pytest.approx([1e-3 * f for f in (0.2, 0.4, 0.6, 0.8, 1, 1)])
    # each iteration reports the rate of its last step
    assert [s["critic_lr"] for s in reported] == pytest.approx([1.6e-3, 2e-3, 2e-3])
    assert [s["actor_lr"] for s in reported] == pytest.approx([0.4e-3, 0.8e-3, 1e-3])

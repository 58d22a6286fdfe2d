"""PPOTrainer's configurations on a small float64 model: each estimator and loss option runs, reports what it
did, and changes the weights; the single-policy-step shortcut for π_prox equals an explicit proximal pass."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from learner.batch import build_batch
from learner.trainer import PPOTrainer
from services.config import LearnerConfig
from tests.support.dp_worker import make_groups, make_models


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
                        advantage="grpo", policy_steps_per_iter=2, step_over="batch")  # step 1: the whole batch
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


def test_linear_decay_after_the_warm_up_by_hand() -> None:
    """ORZ-32B's annealing stage: no warm-up, lr decays linearly to 0.3 of itself over 100 iterations. Here over 4
    iterations to 0.5; the critic's 2 steps per iteration spread the same decay over 8 critic steps."""
    from learner.trainer import lr_factor

    actor = [lr_factor(0, 4, 0.5, 1)(k) for k in range(6)]
    assert actor == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5, 0.5])
    critic = [lr_factor(0, 4, 0.5, 2)(k) for k in range(10)]
    assert critic == pytest.approx([1.0, 0.9375, 0.875, 0.8125, 0.75, 0.6875, 0.625, 0.5625, 0.5, 0.5])
    # with a warm-up of 2 steps first: 1/2, 2/2, then the decay
    assert [lr_factor(2, 4, 0.5, 1)(k) for k in range(4)] == pytest.approx([0.5, 1.0, 1.0, 0.875])
    assert [lr_factor(3)(k) for k in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])  # ORZ's shape


@pytest.mark.parametrize(("step_over", "passes"), [("minibatches", 1), ("batch", 4)])
def test_critic_steps_take_one_pass_over_mini_batches(step_over: str, passes: int) -> None:
    """ORZ's critic_update_steps: 4 optimiser steps over 4 mini-batches see each sample once; `step_over: batch`
    sees it 4 times (an epoch per step). Counted at the critic's training forwards."""
    actor, critic = make_models()
    cfg = LearnerConfig(actor_lr=1e-3, critic_lr=1e-3, warmup_steps=1, critic_steps_per_iter=4, step_over=step_over,
                        max_tokens_per_microbatch=60)
    trainer = PPOTrainer(cfg, actor, critic, None)
    seen: list[int] = []
    critic.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]) if mod.training else None)
    steps: list[int] = []
    trainer.critic_opt.register_step_pre_hook(lambda *a: steps.append(len(seen)))
    batch = build_batch(make_groups(), pad_id=0)
    trainer.step(batch)
    assert sum(seen) == passes * batch.size and len(steps) == 4
    per_step = np.diff([0, *steps])
    if step_over == "minibatches":  # 4 different mini-batches, balanced by tokens
        assert per_step.min() >= 1

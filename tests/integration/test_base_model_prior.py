"""The tiny base model's prior, sampled as the generators sample it (vLLM engine, temperature 1, ORZ's stop
string) and graded by a real `orz reward-server`: it mostly guesses, its guesses are right only by chance,
and when it works a problem out it is usually right. That gap is what the 0/1 reward turns into longer
reasoning (docs/tiny-task.md gives the measured figures)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from generator.engine import VllmEngine
from generator.reward_client import GradeItem, RewardClient
from services.config_io import load_config
from services.protocol import SamplingParams
from services.tasks import all_problems, answer_range, eval_set

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_base_model_mostly_guesses_and_works_out_right(tiny_base_model: Path, reward_server: str) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", environ={})
    tc = cfg.task
    problems = eval_set(all_problems(tc.min_terms, tc.max_terms, tc.max_operand), tc.eval_size, tc.seed)
    tok = AutoTokenizer.from_pretrained(str(tiny_base_model))
    engine = VllmEngine(tiny_base_model, kv_cache_mb=64, seed=0)
    params = SamplingParams(1.0, 1.0, cfg.sampling.max_tokens, tuple(cfg.sampling.stop))
    outs = engine.generate([tok.encode(p.prompt, add_special_tokens=False) for p in problems],
                           [params] * len(problems), [4] * len(problems))
    samples = [(p, c) for p, comps in zip(problems, outs) for c in comps]
    client = RewardClient(reward_server, timeout_s=30.0)
    try:
        grades = client.grade([GradeItem(str(i), c.text, str(p.answer), tc.task_type, c.finish_reason == "length")
                               for i, (p, c) in enumerate(samples)])
    finally:
        client.close()
    reward = {g.id: g.reward for g in grades}
    kinds: dict[str, list[tuple[float, int]]] = {"guess": [], "worked": []}
    for i, (_, c) in enumerate(samples):
        kind = "guess" if c.text.lstrip().startswith("</think>") else "worked"
        kinds[kind].append((reward[str(i)], len(c.token_ids)))
    n = len(samples)
    guess_frac = len(kinds["guess"]) / n
    guess_acc = sum(r for r, _ in kinds["guess"]) / len(kinds["guess"])
    worked_acc = sum(r for r, _ in kinds["worked"]) / len(kinds["worked"])
    guess_len = sum(t for _, t in kinds["guess"]) / len(kinds["guess"])
    worked_len = sum(t for _, t in kinds["worked"]) / len(kinds["worked"])
    print(f"{n} samples: guesses {guess_frac:.3f} (right {guess_acc:.3f}, {guess_len:.1f} tokens), "
          f"worked {1 - guess_frac:.3f} (right {worked_acc:.3f}, {worked_len:.1f} tokens)")
    lo, hi = answer_range(tc.min_terms, tc.max_terms, tc.max_operand)
    chance = 1 / (hi - lo + 1)
    assert 0.7 <= guess_frac <= 0.97  # mostly guesses (pretraining's last mix: 85 %), but not always
    assert guess_acc < 3 * chance + 0.02  # a guess carries no information about the answer
    assert worked_acc > 0.8  # but the model can compute
    assert worked_len > 2.5 * guess_len  # and computing takes longer

"""`orz up` on the tiny config, for real: Redis, reward server, 2 generators (vLLM; once the transformers
fallback), the learner, evaluation.

Asserts that the system learns: versions advance, generators load new weights mid-run, no task is trained
twice, and the reward climbs by far more than noise. With 16 prompts × 8 samples per step the standard
error of one step's mean reward is at most sqrt(0.25/128) ≈ 0.044, and of an 8-step mean about 0.016
(less with the within-group correlation ignored); the margins below are several times that. And ORZ's
signature: the responses grow as the reward rises, since on the tiny task working a problem out (about 37
tokens) is what the 0/1 reward pays for and the base model mostly guesses (about 12 tokens; response
length first 10 steps about 17 tokens, 37 after 100 steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = int(os.environ.get("ORZ_E2E_STEPS", "40"))
WINDOW = 8


@pytest.mark.slow
@pytest.mark.parametrize(("advantage", "kl_coef", "backend"),
                         [("gae", 0.0, "vllm"), ("grpo", 0.04, "vllm"), ("gae", 0.0, "transformers")])
def test_tiny_run_learns(tmp_path: Path, advantage: str, kl_coef: float, backend: str) -> None:
    """ORZ's PPO-GAE, and GRPO as DeepSeekMath runs it (no critic; a k3 KL to the base model, β = 0.04, which
    loads the reference model), on the same stack: both must raise the reward and keep it; and ORZ's PPO-GAE
    with the transformers fallback engine in the generators instead of vLLM. The same checks for all three."""
    run_dir = tmp_path / "runs"
    cmd = [sys.executable, "-m", "services.cli", "up", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--set", f"run_dir={run_dir}", "--set", "run_name=e2e", "--set", f"learner.total_steps={STEPS}",
           "--set", f"learner.advantage={advantage}", "--set", f"learner.kl_coef={kl_coef}",
           "--set", f"generator.backend={backend}", "--set", f"learner.eval_every={STEPS // 2}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORZ__")}
    t0 = time.time()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    print(proc.stdout[-6000:])
    print(f"orz up took {time.time() - t0:.0f} s")
    run = run_dir / "e2e"
    if proc.returncode != 0:
        for log in sorted((run / "logs").glob("*.log")):
            print(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    assert proc.returncode == 0, proc.stderr[-3000:]

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    print("reward curve:", " ".join(f"{r['reward_mean']:.2f}" for r in records))

    # Versions advance one per step.
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["policy_version"] for r in records] == list(range(1, STEPS + 1))
    assert {r["advantage"] for r in records} == {advantage}
    assert ("value_loss" in records[0]["stats"]) == (advantage == "gae")  # GRPO trains no critic
    # The KL term is computed against the base model, which starts equal to the policy: 0 at the first step.
    assert ("kl_ref" in records[0]["stats"]) == (kl_coef > 0)
    if kl_coef > 0:
        assert records[0]["stats"]["kl_ref"] < 1e-6 < max(r["stats"]["kl_ref"] for r in records)

    # Generators loaded new weights: late groups were sampled under late versions, within max_staleness.
    late = [v for r in records[-5:] for v in r["group_versions"]]
    assert min(late) >= STEPS - 5 - 1 - 1, late  # version at training minus max_staleness (1), at worst
    assert all(r["staleness_max"] <= 1 for r in records)
    # Both generators contributed.
    assert len({g for r in records for g in r["generator_ids"]}) == 2

    # Every fed task was trained at most once, and only fed tasks were trained.
    ledger = [json.loads(line) for line in (run / "tasks.jsonl").read_text().splitlines()]
    fed = {e["task_id"] for e in ledger if e["event"] == "fed"}
    trained = [e["task_id"] for e in ledger if e["event"] == "trained"]
    assert len(trained) == len(set(trained)) == STEPS * 16
    assert set(trained) <= fed
    assert trained == [t for r in records for t in r["task_ids"]]

    # Learning: the last steps' reward is well above the first steps', and held there. GRPO without a KL term
    # (ORZ's comparison, in the README's 3-seed tables) is not held to that here: on this 0.7M-parameter model
    # at actor lr 3e-4 it puts each sample's advantage on every token, the format's included, and in three CI
    # runs it lost the format (`</think> </think> 5-3}</answer>`, no boxed answer) and with it the reward; a
    # group whose samples all score 0 gives GRPO no gradient, so such a run stays at 0. On CI: 2026-12-01, 0.68
    # by step 26, then 0.2; 2026-12-02, no 8-step window above 0.21; 2026-12-07 (vLLM), 0.30 by step 15, then
    # 0.00 from step 17 on. The KL to the base model pulls those tokens back: with it the same drift began
    # (seed 0, step 17: ` </think> </think> </think> <answer>\boxed{27}</answer>`, the k3 estimate up from 0.01
    # to 0.54) and the format held; GRPO learned on each of 4 seeds (bench/results/grpo-kl-e2e-2026-12-07.json).
    means = [sum(r["reward_mean"] for r in records[i:i + WINDOW]) / WINDOW for i in range(STEPS - WINDOW + 1)]
    first, last, best = means[0], means[-1], max(means)
    print(f"reward first {WINDOW} steps {first:.3f}, last {WINDOW} steps {last:.3f}, best {WINDOW} {best:.3f}")
    assert last - first > 0.25
    len_first = sum(r["response_len_mean"] for r in records[:WINDOW]) / WINDOW
    len_last = sum(r["response_len_mean"] for r in records[-WINDOW:]) / WINDOW
    print(f"response length first {WINDOW} steps {len_first:.1f}, last {WINDOW} steps {len_last:.1f}")
    assert len_last > 1.3 * len_first

    # Held-out accuracy, measured by the same evaluator on the base and the trained model.
    summary = json.loads((run / "summary.json").read_text())
    print("summary:", json.dumps(summary, indent=1))
    assert 0.05 <= summary["base_accuracy"] <= 0.3  # the base model mostly guesses
    assert summary["trained_accuracy"] > summary["base_accuracy"] + 0.25
    # The in-training evaluation ran at mid-run and at the end, on the current weights.
    evals = {r["step"]: r["eval_accuracy"] for r in records if r.get("eval_accuracy") is not None}
    assert set(evals) == {STEPS // 2, STEPS}, evals
    assert evals[STEPS] > summary["base_accuracy"] + 0.25
    assert (run / "curves.png").stat().st_size > 10_000
    assert (run / "checkpoints" / "final" / "model.safetensors").exists()
    assert (run / "checkpoints" / "final" / "critic").exists() == (advantage == "gae")

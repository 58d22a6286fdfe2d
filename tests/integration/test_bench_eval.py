"""`orz eval --bench`: the whole path (templates, engine, reward server with each benchmark's grader, scoring,
table, JSON) on every shipped benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from generator.bench_eval import pass_at_k
from learner.base_model import build_base_model
from services.config import Config

ROOT = Path(__file__).resolve().parents[2]
BENCHES = "math500,aime2024,gpqa_diamond,gsm8k,amc23"


def test_pass_at_k_against_brute_force() -> None:
    from itertools import combinations

    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                outcomes = [1] * c + [0] * (n - c)
                draws = list(combinations(range(n), k))
                brute = sum(any(outcomes[i] for i in d) for d in draws) / len(draws)
                assert pass_at_k(n, c, k) == pytest.approx(brute)


def test_gold_answers_score_100_percent_on_every_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "oracle.json"
    proc = subprocess.run([sys.executable, "-m", "services.cli", "eval", "--bench", BENCHES, "--oracle", "--n", "2",
                           "--k", "1,2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["benchmarks"]) == set(BENCHES.split(","))
    for name, r in results["benchmarks"].items():
        assert r["pass@1"] == 1.0 and r["pass@2"] == 1.0, (name, r["verdicts"])
        assert r["problems"] > 0 and r["skipped"] == 0
    assert "gpqa_diamond" in proc.stdout and "100.0" in proc.stdout  # the table


def test_unknown_benchmark_is_a_clear_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "services.cli", "eval", "--bench", "mmlu", "--oracle"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "unknown benchmark 'mmlu'" in proc.stderr


@pytest.mark.slow
def test_tiny_model_on_a_slice_of_each_benchmark(tmp_path: Path) -> None:
    # The tiny task's tokenizer with a random model whose context fits real prompts (GPQA runs to ~4k tokens
    # with this tokenizer); the scores are ~0 — this checks the plumbing, the table and the JSON.
    base = build_base_model(Config.model_validate({"model": {"pretrain_steps": 5, "pretrain_batch": 8}}),
                            tmp_path / "base", force=True)
    tok = AutoTokenizer.from_pretrained(str(base))
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    Qwen2ForCausalLM(cfg).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    out = tmp_path / "tiny.json"
    proc = subprocess.run([sys.executable, "-m", "services.cli", "eval", "--bench", BENCHES, "--model", str(model_dir),
                           "--n", "2", "--k", "1,2", "--limit", "3", "--out", str(out),
                           "--set", "generator.max_model_len=8192", "--set", "generator.kv_cache_mb=128",
                           "--set", "eval.max_tokens=16"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["model"] == str(model_dir) and results["n"] == 2
    for name, r in results["benchmarks"].items():
        assert r["problems"] + r["skipped"] == 3, name
        assert r["problems"] >= 1, name
        assert 0.0 <= r["pass@1"] <= r["pass@2"] <= 1.0
        assert 0 < r["mean_response_tokens"] <= 16
        assert 0.0 <= r["truncation_rate"] <= 1.0
        assert sum(r["verdicts"].values()) == r["problems"] * 2
    for name in BENCHES.split(","):
        assert name in proc.stdout

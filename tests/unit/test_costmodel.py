"""The simulation's cost models (services/costmodel.py, generator/sim_engine.py) against values worked out by
hand from the spec-sheet numbers, and the simulated engine against a token-by-token brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from generator.reward_client import GradeItem
from generator.sim_engine import SimEngine, SimRewardClient
from services.costmodel import QWEN25_7B, R1_DISTILL_15B, CostModel, LengthModel
from services.protocol import SamplingParams


def test_model_shapes_by_hand() -> None:
    assert QWEN25_7B.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2 == 57_344
    assert R1_DISTILL_15B.kv_bytes_per_token == 28_672
    assert QWEN25_7B.weight_bytes == pytest.approx(15.24e9)


def test_decode_training_and_capacity_by_hand() -> None:
    cost = CostModel(QWEN25_7B, train_gpus=64, train_flops_per_token=14.0)
    # one sequence, empty cache: 2 ms + 15.24 GB / (3.35 TB/s × 0.7)
    assert cost.decode_iteration_s(1, 0) == pytest.approx(0.002 + 15.24e9 / 2.345e12)
    # 256 sequences of 2k: + 256 × 2048 × 57,344 B of KV read per iteration
    assert cost.decode_iteration_s(256, 256 * 2048) == pytest.approx(0.002 + (15.24e9 + 524_288 * 57_344) / 2.345e12)
    # compute-bound when the batch is huge and the cache tiny: 2 × 7.62e9 × 10,000 / (989e12 × 0.5)
    assert cost.decode_iteration_s(10_000, 0) == pytest.approx(0.002 + 2 * 7.62e9 * 1e4 / 494.5e12)
    # 14 × 7.62e9 × 1e6 tokens / (64 × 989e12 × 0.35)
    assert cost.train_s(1e6) == pytest.approx(1.0668e17 / (64 * 989e12 * 0.35))
    assert cost.train_s(1e6, gpus=128) == pytest.approx(cost.train_s(1e6) / 2)
    # (80 GB × 0.9 − 15.24 GB) / 57,344 B
    assert cost.kv_capacity_tokens == int((72e9 - 15.24e9) / 57_344)
    assert cost.broadcast_s() == pytest.approx(15.24e9 / 20e9)


def test_length_model_matches_the_log_normal() -> None:
    lengths = LengthModel(median=4500, sigma=0.6, max_tokens=8192)
    z = math.log(8192 / 4500) / 0.6
    assert lengths.truncated_fraction() == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)), abs=0.005)
    draws = lengths.sample(np.random.default_rng(1), 50_000)
    assert draws.max() == 8192 and draws.min() >= 1
    assert np.median(draws) == pytest.approx(4500, rel=0.03)


def _brute_force_seconds(cost: CostModel, prompt_len: int, targets: list[int]) -> float:
    """Every sequence admitted at once, one iteration per token: Σ over iterations of the iteration time."""
    seconds = cost.prefill_s(prompt_len * len(targets))
    generated = [0] * len(targets)
    while any(g < t for g, t in zip(generated, targets)):
        running = [i for i, (g, t) in enumerate(zip(generated, targets)) if g < t]
        context = sum(prompt_len + generated[i] for i in running)
        seconds += cost.decode_iteration_s(len(running), context)
        for i in running:
            generated[i] += 1
    return seconds


def test_engine_time_equals_token_by_token_sum() -> None:
    cost = CostModel(R1_DISTILL_15B)
    engine = SimEngine(cost, LengthModel(300, 0.8, 900), time_scale=0.0, seed=3, chunk_s=0.05)
    engine.submit("a", [1] * 40, SamplingParams(1.0, 1.0, 900), 5)
    engine.submit("b", [1] * 40, SamplingParams(1.0, 1.0, 900), 3)
    targets = [s.target for s in engine.waiting]
    done = {}
    while engine.requests:
        for rid, comps in engine.step():
            done[rid] = comps
    assert engine.simulated_s == pytest.approx(_brute_force_seconds(cost, 40, targets), rel=1e-9)
    assert engine.decoded_tokens == sum(targets)
    got = sorted(len(c.token_ids) for comps in done.values() for c in comps)
    assert got == sorted(targets)
    assert {len(done["a"]), len(done["b"])} == {5, 3}
    assert all(c.logprobs.shape == c.token_ids.shape and len(c.text) == 4 * len(c.token_ids)
               for comps in done.values() for c in comps)


def test_engine_respects_capacity_and_preempts_without_losing_work() -> None:
    cost = CostModel(R1_DISTILL_15B, max_num_seqs=8, gpu_memory_utilization=(3.56e9 + 3000 * 28_672) / 80e9)
    assert 2900 < cost.kv_capacity_tokens <= 3000
    engine = SimEngine(cost, LengthModel(400, 0.5, 1000), time_scale=0.0, seed=1)
    for i in range(6):
        engine.submit(f"r{i}", [1] * 50, SamplingParams(1.0, 1.0, 1000), 4)
    targets = sum(s.target for s in engine.waiting)
    assert engine.queued() == 16  # 24 samples, 8 slots: 16 would wait (the generator's admission reads this)
    finished = []
    while engine.requests:
        finished += engine.step()
        assert len(engine.running) <= 8
        assert engine.queued() == max(0, len(engine.waiting) + len(engine.running) - 8)
        assert sum(s.context for s in engine.running) <= cost.kv_capacity_tokens or len(engine.running) == 1
    assert sorted(rid for rid, _ in finished) == [f"r{i}" for i in range(6)]
    assert engine.decoded_tokens == targets  # a preempted sequence keeps its tokens (recomputed, not redone)
    assert engine.preempted > 0


def test_abort_and_truncation() -> None:
    cost = CostModel(R1_DISTILL_15B)
    engine = SimEngine(cost, LengthModel(5000, 0.1, 64), time_scale=0.0, seed=0)
    engine.submit("keep", [1] * 10, SamplingParams(1.0, 1.0, 64), 2)
    engine.submit("drop", [1] * 10, SamplingParams(1.0, 1.0, 64), 2)
    engine.abort(["drop"])
    out = []
    while engine.requests:
        out += engine.step()
    assert [rid for rid, _ in out] == ["keep"]
    assert all(c.finish_reason == "length" and len(c.token_ids) == 64 for c in out[0][1])
    grades = SimRewardClient(cost, 0.0, seed=0, p_correct=1.0).grade(
        [GradeItem("0", "", "1", "math", True), GradeItem("1", "", "1", "math", False)])
    assert [g.reward for g in grades] == [0.0, 1.0]  # truncated scores 0

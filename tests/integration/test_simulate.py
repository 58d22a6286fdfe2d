"""bench/simulate.py for real on a small setting: a real redis-server, the real learner loop with its feeder
and weight-sync group (gloo, 4 members), 4 real generator loops in a worker process, cost-model engines."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]


def _simulate_module():
    spec = importlib.util.spec_from_file_location("bench_simulate", ROOT / "bench" / "simulate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_simulate"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_simulation_runs_the_real_loops_at_the_modelled_speed(redis_url: str, tmp_path: Path) -> None:
    sim = _simulate_module()
    preset = sim.PRESETS["smoke"]
    steps = 6
    report = sim.simulate("smoke", generators=4, train_gpus=8, staleness=1, steps=steps, scale=preset.time_scale,
                          per_proc=4, chars_per_token=4, redis_url=redis_url, run_dir=tmp_path, name="smoke")
    records = [json.loads(x) for x in (tmp_path / "smoke" / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in records] == list(range(1, steps + 1))
    assert len({g for r in records for g in r["generator_ids"]}) == 4  # every generator contributed
    assert all(r["staleness_max"] <= 1 for r in records)
    assert all(len(r["task_ids"]) == 16 for r in records)
    assert report["generators"] == 4 and report["steps"] == steps
    # The generators really slept their modelled time: their engines were busy most of the run, and the
    # pipeline ran no faster than the bound the cost model allows (a broken sleep would beat it many times).
    ideal = sim.ideal(preset, preset.cost, 4)
    assert 0.3 < report["steps_per_hour"] / ideal["steps_per_hour"] < 1.15
    assert report["train_s_per_step"] == pytest.approx(ideal["train_s_per_batch"], rel=0.3)
    assert report["learner_cpu_s_per_step"] > 0 and report["redis_cpu_s_per_step"] > 0
    # Acked entries are trimmed each step: the trajectory stream holds at most what is in flight.
    client = redis.Redis.from_url(redis_url)
    assert client.xlen("orz:smoke:trajectories") <= 16 * 2

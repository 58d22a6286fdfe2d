"""Dynamic sampling (`learner.filter_groups: zero_variance`) inside the exact accounting, for real: a real
redis-server, the real learner process (GRPO on the tiny base model), and a scripted generator that answers
every prompt, two in three of them with groups whose samples all earn the same reward. Batches stay full,
the ledger adds up (trained + filtered + dropped as stale + in flight = fed, none twice), and a kill -9 of the
learner after its checkpoint followed by `--resume` keeps it exact."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from services.config_io import config_to_env, load_config
from services.control import ControlPlane, Keys
from services.protocol import Sample, TrajectoryGroup
from services.queue import prompt_queue, trajectory_queue
from services.redis_client import connect
from services.redis_server import EmbeddedRedis
from tests.support.harness import ROOT, Proc

STEPS, CKPT, BATCH, N = 12, 4, 4, 4


def _no_signal(task_id: str) -> bool:
    return int(hashlib.sha256(task_id.encode()).hexdigest(), 16) % 3 != 0  # two in three


def _generate(url: str, keys: Keys, stop: threading.Event, answered: list[str]) -> None:
    """Reads prompts as a generator does (group `generators`) and publishes one group per prompt, then acks."""
    client = connect(url, socket_timeout_s=10.0)
    prompts, trajectories = prompt_queue(client, keys), trajectory_queue(client, keys)
    control = ControlPlane(client, keys)
    rng = np.random.default_rng(0)
    while not stop.is_set():
        for entry_id, task in prompts.read("script", 8, block_ms=200):
            version = control.policy_version() or 0
            rewards = [1.0] * N if _no_signal(task.task_id) else [float(i % 2) for i in range(N)]
            samples = tuple(Sample(rng.integers(5, 60, size=6).astype(np.int32),
                                   np.full(6, -1.0, dtype=np.float32), r, "stop", "x") for r in rewards)
            trajectories.add(TrajectoryGroup(task.task_id, np.asarray(task.prompt_ids, dtype=np.int32), samples,
                                             version, "script", version))
            prompts.ack([entry_id])
            answered.append(task.task_id)


@pytest.mark.slow
def test_filtered_groups_keep_batches_full_and_the_ledger_exact_across_a_resume(tmp_path: Path) -> None:
    with EmbeddedRedis(appendonly=True, workdir=str(tmp_path / "redis")) as redis_server:
        cfg = load_config(ROOT / "configs" / "tiny.yaml", environ={}, overrides={
            "run_dir": str(tmp_path / "runs"), "run_name": "dyn", "redis": {"url": redis_server.url},
            # max_oversample high enough that no step runs short (the cap is tests/integration/test_intake.py's)
            "learner": {"advantage": "grpo", "filter_groups": "zero_variance", "max_oversample": 100,
                        "total_steps": STEPS, "batch_prompts": BATCH, "n_samples": N, "checkpoint_every": CKPT,
                        "max_staleness": 1, "wait_timeout_s": 120},
        })
        keys = Keys(cfg.namespace)
        logs = tmp_path / "logs"
        logs.mkdir()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("ORZ__")}, **config_to_env(cfg)}
        learner = Proc("learner", ["learner"], env, logs)
        stop, answered = threading.Event(), []
        script = threading.Thread(target=_generate, args=(redis_server.url, keys, stop, answered), daemon=True)
        script.start()
        run = cfg.run_path
        try:
            deadline = time.time() + 300
            while time.time() < deadline and len(_records(run)) < CKPT + 2:
                assert learner.alive, learner.text()[-3000:]
                time.sleep(0.1)
            assert (run / "checkpoints" / "latest").exists(), learner.text()[-3000:]
            learner.signal(signal.SIGKILL)
            learner.args = ["learner", "--resume"]
            learner.restart()
            deadline = time.time() + 300
            while time.time() < deadline and not (run / "DONE").exists():
                assert learner.alive or (run / "DONE").exists(), learner.text()[-3000:]
                time.sleep(0.2)
            assert learner.p.wait(60) == 0, learner.text()[-3000:]
        finally:
            stop.set()
            learner.stop()
            script.join(10)

    records = _records(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # every step once, in the resumed lineage
    assert all(len(r["task_ids"]) == BATCH for r in records)  # full batches, filtering notwithstanding
    ledger = [json.loads(x) for x in (run / "tasks.jsonl").read_text().splitlines()]
    by = {e: [x["task_id"] for x in ledger if x["event"] == e] for e in ("fed", "trained", "filtered",
                                                                       "dropped_stale")}
    done = json.loads((run / "DONE").read_text())
    inflight = set(done["inflight"])
    assert len(by["trained"]) == len(set(by["trained"])) == STEPS * BATCH  # none twice
    assert len(by["filtered"]) == len(set(by["filtered"])) > 0
    assert not set(by["filtered"]) & (set(by["trained"]) | set(by["dropped_stale"]) | inflight)
    assert set(by["fed"]) == set(by["trained"]) | set(by["filtered"]) | set(by["dropped_stale"]) | inflight
    assert records[-1]["filtered_groups_total"] == len(by["filtered"])
    assert all(not _no_signal(t) for t in by["trained"])  # only groups with a signal were trained
    assert all(_no_signal(t) for t in by["filtered"])
    assert done["unaccounted"] == []


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []

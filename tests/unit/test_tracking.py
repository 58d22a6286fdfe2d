"""Experiment tracking (learner/tracking.py, learner/sinks.py) with the real libraries, read back with their own
readers: the names a record's scalars get, the samples table, and a resume from a checkpoint older than the last
logged step (TensorBoard rewinds to the resumed run; W&B and MLflow keep the first values; no step twice or
missing anywhere). The learner process doing the same after a real kill -9 is tests/e2e/test_resume.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from learner.tracking import Tracker, sample_rows, tracked_scalars
from services.config import Config
from services.protocol import Sample, TrajectoryGroup
from tests.support.trackers import (
    mlflow_history,
    tensorboard_scalars,
    tensorboard_text_steps,
    wandb_history,
    wandb_records,
)


def test_scalar_names_and_what_is_left_out() -> None:
    record = {"step": 3, "time": 1e9, "advantage": "gae", "reward_mean": 0.5, "value_loss": float("nan"),
              "wait_s": 1.5, "eval_accuracy": 0.25, "task_ids": ["a"], "stats": {"pg_loss": -0.1, "bad": [1]},
              "sources": {"gsm8k": {"reward_mean": 0.75, "groups": 3}}, "eval_source_accuracy": {"gsm8k": 0.5},
              "filtered_groups": 2}
    assert tracked_scalars(record) == {
        "train/reward_mean": 0.5, "time/wait_s": 1.5, "eval/accuracy": 0.25, "stats/pg_loss": -0.1,
        "source/gsm8k/reward_mean": 0.75, "source/gsm8k/groups": 3.0, "source/gsm8k/eval_accuracy": 0.5,
        "train/filtered_groups": 2.0}


def test_sample_rows_clip_long_texts_keeping_the_answer() -> None:
    text = "w" * 5000 + "\\boxed{7}"
    samples = (Sample(np.zeros(3, np.int32), np.zeros(3, np.float32), 1.0, "stop", text, "correct"),)
    groups = [TrajectoryGroup(f"0000000{i}:gsm8k:{i}", np.arange(4, dtype=np.int32), samples, 2, "gen-0")
              for i in range(6)]
    rows = sample_rows(9, groups, lambda ids: "p" + "".join(map(str, ids)), 4, 100, lambda t: t.split(":")[1])
    assert len(rows) == 4 and rows[0]["prompt"] == "p0123" and rows[0]["source"] == "gsm8k"
    assert rows[0]["response"].endswith("\\boxed{7}") and len(rows[0]["response"]) == 103
    assert {k: rows[0][k] for k in ("step", "reward", "verdict", "finish_reason", "policy_version")} == {
        "step": 9, "reward": 1.0, "verdict": "correct", "finish_reason": "stop", "policy_version": 2}


def test_sample_rows_take_texted_groups_first_and_decode_the_rest() -> None:
    """Groups travel without texts unless their prompt asked: those that have them come first, and a row of one
    that has none shows its response decoded from the token ids."""
    def group(i: int, text: str) -> TrajectoryGroup:
        s = Sample(np.array([i, i + 1], np.int32), np.zeros(2, np.float32), 0.0, "stop", text, "wrong")
        return TrajectoryGroup(f"t{i}:arith:{i}", np.array([9], np.int32), (s,), 1, "gen-0")

    groups = [group(1, ""), group(2, "two"), group(3, ""), group(4, "four")]
    decode = lambda ids: "ids " + " ".join(map(str, ids))  # noqa: E731
    rows = sample_rows(5, groups, decode, 3, 100, lambda t: t.split(":")[1])
    assert [(r["task_id"], r["response"]) for r in rows] == [
        ("t2:arith:2", "two"), ("t4:arith:4", "four"), ("t1:arith:1", "ids 1 2")]


def _record(step: int, lineage: int) -> dict:
    return {"step": step, "reward_mean": step / 10 + lineage, "step_time_s": 1.0 + step}


def test_a_resume_behind_the_last_logged_step_logs_each_step_once(tmp_path: Path) -> None:
    cfg = Config.model_validate({"run_name": "track", "logging": {"sinks": ["tensorboard", "wandb", "mlflow"]},
                                 "redis": {"password": "hunter2"}, "reward": {"token": "s3cret"}})
    row = [{"step": 0, "task_id": "t", "source": "s", "reward": 1.0, "verdict": "correct", "finish_reason": "stop",
            "policy_version": 0, "prompt": "p", "response": "r"}]
    first = Tracker(cfg, tmp_path, None, None)
    checkpoint = None
    for step in range(1, 7):  # the lost lineage: steps 1-6, a checkpoint at 4
        first.log(_record(step, 0), [{**row[0], "step": step}])
        if step == 4:
            checkpoint = first.checkpoint_state()
    first.close("FAILED")
    ids = first.ids()
    assert json.loads((tmp_path / "tracking.json").read_text())["logged"] == {
        "tensorboard": 6, "wandb": 6, "mlflow": 6}

    resumed = Tracker(cfg, tmp_path, checkpoint, 4)
    assert resumed.ids()["wandb_run_id"] == ids["wandb_run_id"]
    assert resumed.ids()["mlflow_run_id"] == ids["mlflow_run_id"]
    for step in range(5, 9):  # the resumed lineage: steps 5-8 again from the checkpoint
        resumed.log(_record(step, 100), [{**row[0], "step": step}])
    resumed.close("FINISHED")

    expected_new = [(s, s / 10 + (100 if s > 4 else 0)) for s in range(1, 9)]
    expected_first = [(s, s / 10 + (100 if s > 6 else 0)) for s in range(1, 9)]
    tb = tensorboard_scalars(tmp_path / "tensorboard", "train/reward_mean")
    assert [s for s, _ in tb] == list(range(1, 9))  # purged: the lost lineage's 5 and 6 are gone
    assert all(math.isclose(v, e, rel_tol=1e-6) for (_, v), (_, e) in zip(tb, expected_new))
    assert tensorboard_text_steps(tmp_path / "tensorboard") == list(range(1, 9))
    wb = wandb_history(tmp_path / "wandb", "train/reward_mean")
    assert [s for s, _ in wb] == list(range(1, 9))  # two offline runs of one id, 1-6 then 7-8
    assert all(math.isclose(v, e, rel_tol=1e-6) for (_, v), (_, e) in zip(wb, expected_first))
    ml = mlflow_history(ids["mlflow_tracking_uri"], ids["mlflow_run_id"], "train/reward_mean")
    assert [s for s, _ in ml] == list(range(1, 9))
    assert all(math.isclose(v, e, rel_tol=1e-6) for (_, v), (_, e) in zip(ml, expected_first))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ids["mlflow_tracking_uri"])
    run = client.get_run(ids["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["learner.advantage"] == "gae"
    assert run.data.params["redis.password"] == run.data.params["reward.token"] == "<redacted>"
    wandb_config = next(r for r in wandb_records(tmp_path / "wandb") if r["type"] == "run")["run"]["config"]
    assert "hunter2" not in json.dumps(wandb_config) and "s3cret" not in json.dumps(wandb_config)
    assert "learner" in json.dumps(wandb_config)
    assert len(client.list_artifacts(ids["mlflow_run_id"], "samples")) == 8
    # samples.jsonl (the jsonl sink's table) was cut back to the checkpoint, then continued
    assert [json.loads(x)["step"] for x in (tmp_path / "samples.jsonl").read_text().splitlines()] == list(range(1, 9))

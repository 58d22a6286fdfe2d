"""Reading back what the experiment trackers wrote, each with its own library's reader: TensorBoard's
EventAccumulator, W&B's `wandb leet inspect --json` over the offline run directories, MLflow's client."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _tensorboard(log_dir: Path):
    """TensorBoard's own loader (the plugin accumulator its UI serves from), with nothing sampled away."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def tensorboard_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar, as TensorBoard shows it (what a resumed writer purged left out)."""
    from tensorboard.util.tensor_util import make_ndarray

    return [(e.step, float(make_ndarray(e.tensor_proto))) for e in _tensorboard(log_dir).Tensors(tag)]


def tensorboard_text_steps(log_dir: Path, tag: str = "samples") -> list[int]:
    return [e.step for e in _tensorboard(log_dir).Tensors(f"{tag}/text_summary")]


def wandb_records(wandb_dir: Path) -> list[dict]:
    """Every record of every offline run under `wandb_dir`, oldest run first, as `wandb leet inspect` prints."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = []
    for run_dir in sorted(wandb_dir.glob("offline-run-*")):
        text = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_dir)], capture_output=True,
                              text=True, timeout=120, check=True).stdout
        out += [{**json.loads(line), "run_dir": run_dir.name} for line in text.splitlines() if line.strip()]
    return out


def wandb_history(wandb_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` across the offline runs, in the order they were logged."""
    rows = []
    for r in wandb_records(wandb_dir):
        if r["type"] == "history" and key in r["history"]["item"]:
            rows.append((int(r["history"]["step"]["num"]), float(r["history"]["item"][key])))
    return rows


def mlflow_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))

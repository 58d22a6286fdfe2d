"""Resumable learner checkpoints, written atomically.

Layout of `<run>/checkpoints/step-000040/` (docs/architecture.md, "One step", 7):
  config.json, model.safetensors, tokenizer files   the actor in Hugging Face format (transformers, vLLM)
  critic/                                           the critic: HF backbone + value_head.safetensors
  trainer_state.pt                                  optimiser and lr-schedule states, RNG states (tensors,
                                                    loaded with `weights_only=True`: no pickle code runs)
  state.json                                        step, policy version, feeder cursor, in-flight prompts,
                                                    the task ids already trained or dropped, log offsets
A checkpoint is written to `.tmp-step-000040/` and renamed into place, then `latest` (a one-line file) is
replaced by rename: a crash at any moment leaves the previous complete checkpoint as `latest`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("orz.learner")

STATE_FILE = "state.json"
TRAINER_FILE = "trainer_state.pt"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def commit(tmp_dir: Path, root: Path, step: int, keep: int) -> Path:
    """Renames a fully written `tmp_dir` to `step-N`, points `latest` at it, prunes old step checkpoints."""
    final = root / step_dir_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp_dir, final)
    _write_atomic(root / LATEST, final.name + "\n")
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def tmp_dir_for(root: Path, step: int) -> Path:
    tmp = root / f".tmp-{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint: `latest`'s target, else the highest step dir holding a state file."""
    pointer = root / LATEST
    if pointer.exists():
        target = root / pointer.read_text().strip()
        if (target / STATE_FILE).exists():
            return target
    candidates = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists())
    return candidates[-1] if candidates else None


def write_state(path: Path, state: dict) -> None:
    (path / STATE_FILE).write_text(json.dumps(state))


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def save_trainer(path: Path, trainer_state: dict) -> None:
    torch.save(trainer_state, path / TRAINER_FILE)


def load_trainer(path: Path) -> dict:
    return torch.load(path / TRAINER_FILE, weights_only=True)


def truncate(path: Path, offset: int) -> None:
    """Cuts a log (metrics.jsonl, tasks.jsonl) back to what it held when the checkpoint was written."""
    if path.exists():
        with path.open("r+b") as f:
            f.truncate(offset)

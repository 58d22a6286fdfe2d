"""Experiment tracking (`logging.sinks`, docs/tracking.md): each metrics.jsonl record, as it is written, goes to
every configured tracker (learner/sinks.py) at its learner step, with its in-training evaluation and a few
sample completions (also appended to samples.jsonl, the jsonl sink's table).

Resuming continues the same tracked runs: the W&B and MLflow run ids are kept in the checkpoint. The steps a
run logged after its last checkpoint and before a crash are trained again by the resumed run. TensorBoard
rewinds (`purge_step`) and shows the resumed run's values for them; W&B and MLflow keep the values first logged
(both append), so the tracker does not send those steps to them again: `tracking.json` holds the last step each
one has written out (for MLflow the store itself is asked as well). TensorBoard and MLflow write every step as
it comes; W&B buffers until its run finishes, so the tracker finishes and continues it at every checkpoint
(learner/sinks.py) and counts only that. Either way each tracker has each step exactly once, none missing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from learner.sinks import MlflowSink, TensorBoardSink, WandbSink, mlflow_uri
from services.config import Config
from services.protocol import TrajectoryGroup

log = logging.getLogger("orz.tracking")

STATE_FILE = "tracking.json"
SAMPLES_FILE = "samples.jsonl"
_TIME_KEYS = {"wait_s", "train_s", "broadcast_s", "step_time_s", "learner_cpu_s", "redis_cpu_s"}
_NOT_TRACKED = {"step", "time"}


def tracked_name(key: str) -> str:
    """metrics.jsonl key → tracker name: `eval/…` for the in-training evaluation, `time/…` for the step's time
    split, `source/<name>/…` for per-source figures, `train/…` for the rest."""
    if key.startswith("eval_"):
        return "eval/" + key.removeprefix("eval_")
    if key in _TIME_KEYS:
        return "time/" + key
    return "train/" + key


def tracked_scalars(record: dict) -> dict[str, float]:
    """The finite numbers of a record under their tracker names (strings, lists and NaN are left out)."""
    out: dict[str, float] = {}

    def put(name: str, value) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)

    for key, value in record.items():
        if key not in _NOT_TRACKED:
            put(tracked_name(key), value)
    for key, value in record.get("stats", {}).items():
        if tracked_name(key) not in out:
            put("stats/" + key, value)
    for source, figures in record.get("sources", {}).items():
        for key, value in figures.items():
            put(f"source/{source}/{key}", value)
    for source, value in record.get("eval_source_accuracy", {}).items():
        put(f"source/{source}/eval_accuracy", value)
    return out


def _clip(text: str, chars: int) -> str:
    """Head and tail of a long text (the tail holds the answer)."""
    return text if len(text) <= chars else text[:chars // 2] + " … " + text[-(chars // 2):]


def sample_rows(step: int, groups: Sequence[TrajectoryGroup], decode: Callable[[Sequence[int]], str], k: int,
                chars: int, source_of: Callable[[str], str]) -> list[dict]:
    """The first sample of `k` of the step's groups, as rows of the samples table: those that carry their texts
    first (the feeder asks for texts in `k` of every batch's prompts), then others, their responses decoded from
    the token ids (a staleness drop or a filter can take a texted group out of the batch)."""
    texted = [g for g in groups if g.samples[0].text]
    chosen = (texted + [g for g in groups if not g.samples[0].text])[:k]
    rows = []
    for g in chosen:
        s = g.samples[0]
        response = s.text or decode(s.response_ids.tolist())
        rows.append({"step": step, "task_id": g.task_id, "source": source_of(g.task_id), "reward": float(s.reward),
                     "verdict": s.verdict, "finish_reason": s.finish_reason, "policy_version": g.policy_version,
                     "prompt": _clip(decode(g.prompt_ids.tolist()), chars), "response": _clip(response, chars)})
    return rows


class Tracker:
    def __init__(self, cfg: Config, run_path: Path, resumed: dict | None, resume_step: int | None,
                 on_error: Callable[[str], None] = lambda _: None) -> None:
        """`resumed`: the checkpoint's `tracking` state, `resume_step` its step (both None for a fresh run)."""
        self.path = run_path / STATE_FILE
        self.on_error = on_error
        saved: dict = {}
        if resume_step is None:  # a fresh run under an existing name starts its tracking over
            self.path.unlink(missing_ok=True)
            tb_default = run_path / "tensorboard"
            if "tensorboard" in cfg.logging.sinks and cfg.logging.tensorboard_dir is None and tb_default.exists():
                shutil.rmtree(tb_default)
            (run_path / SAMPLES_FILE).unlink(missing_ok=True)
        else:
            saved = json.loads(self.path.read_text()) if self.path.exists() else {}
            offset = (resumed or {}).get("samples_offset")
            samples = run_path / SAMPLES_FILE
            if offset is not None and samples.exists():
                with samples.open("r+b") as f:
                    f.truncate(offset)
        ids = {**saved.get("ids", {}), **{k: v for k, v in (resumed or {}).items() if k != "samples_offset"}}
        self.sinks: list = []
        for name in cfg.logging.sinks:
            if name == "tensorboard":
                self.sinks.append(TensorBoardSink(cfg, run_path, resume_step))
            elif name == "wandb":
                self.sinks.append(WandbSink(cfg, run_path, ids.get("wandb_run_id")))
            elif name == "mlflow":  # the run id holds only in the store it was made in
                same_store = ids.get("mlflow_tracking_uri") == mlflow_uri(cfg, run_path)
                self.sinks.append(MlflowSink(cfg, run_path, ids.get("mlflow_run_id") if same_store else None))
        self.samples = (run_path / SAMPLES_FILE).open("a")
        self._errors: dict[str, int] = {}
        # the last step each tracker has: what tracking.json says, what the store says (MLflow), and at least
        # the checkpoint's step (a tracker added to a resumed run starts after it)
        self.logged = {s.name: max(resume_step or 0, int(saved.get("logged", {}).get(s.name, 0)), s.last_step())
                       for s in self.sinks}
        self.durable = dict(self.logged)  # what tracking.json says: the steps each tracker has written out
        for sink in self.sinks:
            if resume_step is not None and not sink.rewinds and self.logged[sink.name] > resume_step:
                log.info("tracking: %s has steps %d-%d from before the crash and keeps them; the resumed run's "
                         "values for them are in metrics.jsonl%s", sink.name, resume_step + 1,
                         self.logged[sink.name], " and tensorboard" if "tensorboard" in cfg.logging.sinks else "")
        if self.sinks:
            log.info("tracking: %s", ", ".join(f"{s.name} {json.dumps(s.ids())}" for s in self.sinks))
        self._save()

    def ids(self) -> dict:
        out: dict = {}
        for sink in self.sinks:
            out.update(sink.ids())
        return out

    def checkpoint_state(self) -> dict:
        """What a checkpoint keeps: the tracked runs' ids and where samples.jsonl ends. Buffering trackers write
        out what they have first."""
        self.samples.flush()
        self._persist()
        return {**self.ids(), "samples_offset": self.samples.tell()}

    def _persist(self) -> None:
        for sink in self.sinks:
            if sink.buffered and self.durable[sink.name] < self.logged[sink.name]:
                try:
                    sink.persist()
                except Exception as exc:
                    self.on_error(sink.name)
                    log.warning("tracking: %s could not write out its steps: %s", sink.name, exc)
                    continue
                self.durable[sink.name] = self.logged[sink.name]
        self._save()

    def log(self, record: dict, samples: list[dict]) -> None:
        """One step, to every tracker that has not had it (a tracker's fault is counted, never stops training)."""
        step = int(record["step"])
        scalars = tracked_scalars(record)
        for row in samples:
            self.samples.write(json.dumps(row) + "\n")
        self.samples.flush()
        for sink in self.sinks:
            if step <= self.logged[sink.name] and not sink.rewinds:
                continue
            try:
                sink.log(step, scalars, samples)
            except Exception as exc:
                n = self._errors[sink.name] = self._errors.get(sink.name, 0) + 1
                self.on_error(sink.name)
                if n == 1 or n % 100 == 0:
                    log.warning("tracking: %s failed to log step %d (%d failures so far): %s", sink.name, step, n,
                                exc)
                continue
            self.logged[sink.name] = step
            if not sink.buffered:
                self.durable[sink.name] = step
                self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"logged": self.durable, "ids": self.ids()}))
        os.replace(tmp, self.path)

    def close(self, status: str) -> None:
        """`status`: FINISHED (the run is done), KILLED (stopped, to be resumed) or FAILED."""
        self.samples.close()
        for sink in self.sinks:
            try:
                sink.close(status)
            except Exception as exc:
                log.warning("tracking: %s did not close cleanly: %s", sink.name, exc)
                continue
            self.durable[sink.name] = self.logged[sink.name]  # a finished run has written everything out
        self._save()

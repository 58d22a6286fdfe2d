"""The experiment trackers behind `logging.sinks` (docs/tracking.md), each through its own library: TensorBoard
event files (torch.utils.tensorboard), Weights & Biases (offline unless `logging.wandb_mode: online`), MLflow (a
local SQLite store unless `logging.mlflow_tracking_uri`). Each gets a step's scalars and its sample completions
as a text table, at the learner's step. learner/tracking.py decides what each one is sent."""

from __future__ import annotations

import importlib
import logging
import os
import time
from pathlib import Path

from services.config import Config

log = logging.getLogger("orz.tracking")

SECRETS = ("redis.password", "reward.token")  # never sent to a tracker (W&B config, MLflow params)
SAMPLE_COLUMNS = ("step", "task_id", "source", "reward", "verdict", "finish_reason", "policy_version", "prompt",
                  "response")


def _require(module: str, sink: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeError(f"logging.sinks lists {sink}, but its library is not installed: "
                           "pip install 'orz-async[tracking]'") from None


class TensorBoardSink:
    """Event files under `logging.tensorboard_dir`. Every writer starts with a session-start event at its first
    step (`purge_step`: 1, or the checkpoint's step + 1 when resumed), so TensorBoard drops what a lost lineage
    wrote past the checkpoint and shows the resumed one. (The first writer needs one too: TensorBoard takes the
    first session start of a run as its beginning and only a later one as a restart.)"""

    name = "tensorboard"
    rewinds = True  # steps past the checkpoint are logged again, and the reader keeps the newer ones
    buffered = False  # flushed every step

    def __init__(self, cfg: Config, run_path: Path, resume_step: int | None) -> None:
        _require("tensorboard", self.name)
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(cfg.logging.tensorboard_dir or run_path / "tensorboard")
        self.writer = SummaryWriter(str(self.dir), purge_step=(resume_step or 0) + 1)

    def ids(self) -> dict:
        return {"tensorboard_dir": str(self.dir)}

    def last_step(self) -> int:
        return 0

    def log(self, step: int, scalars: dict[str, float], samples: list[dict]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        if samples:
            header = "| " + " | ".join(SAMPLE_COLUMNS) + " |\n|" + "---|" * len(SAMPLE_COLUMNS) + "\n"
            rows = ["| " + " | ".join(str(s[c]).replace("|", "\\|").replace("\n", " ") for c in SAMPLE_COLUMNS)
                    + " |" for s in samples]
            self.writer.add_text("samples", header + "\n".join(rows), step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run under `<run>/wandb`; offline (for `wandb sync`) unless `logging.wandb_mode: online`. Its run id
    is kept in the checkpoint and a resumed run continues it (`resume="allow"`).

    W&B's service process buffers what it is sent and writes it out when the run finishes: a learner killed
    with -9 loses the steps since. So at every checkpoint the run is finished and continued under the same id
    (`persist`, about a second), and only what a finish wrote out counts as logged: after a crash the resumed
    run sends W&B the steps past the checkpoint again, and W&B has each step once."""

    name = "wandb"
    rewinds = False  # W&B keeps the first value logged at a step
    buffered = True  # a step it took is safe only once persisted

    def __init__(self, cfg: Config, run_path: Path, run_id: str | None) -> None:
        lc = cfg.logging
        if lc.wandb_mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise RuntimeError("logging.wandb_mode is online but WANDB_API_KEY is not set; set it, or use "
                               "logging.wandb_mode: offline and `wandb sync` the run directory later")
        self.wandb = _require("wandb", self.name)
        # console capture off: the learner's log already goes to its own file, one line per record
        self._init = dict(project=lc.wandb_project, entity=lc.wandb_entity, name=cfg.run_name, dir=str(run_path),
                          mode=lc.wandb_mode, config=public_config(cfg),
                          settings=self.wandb.Settings(console="off", silent=True, disable_git=True))
        self.run = self.wandb.init(id=run_id, resume="allow" if run_id else None, **self._init)
        self._started = time.time()

    def persist(self) -> None:
        """Everything logged so far written out: the run finished and continued under the same id."""
        run_id = self.run.id
        self.run.finish()
        # an offline run's directory is named by the second it starts in: never two in one second
        time.sleep(max(0.0, 1.05 - (time.time() - self._started)))
        self.run = self.wandb.init(id=run_id, resume="allow", **self._init)
        self._started = time.time()

    def ids(self) -> dict:
        return {"wandb_run_id": self.run.id}

    def last_step(self) -> int:
        return 0  # an offline run cannot be asked; tracking.json knows

    def log(self, step: int, scalars: dict[str, float], samples: list[dict]) -> None:
        data: dict = dict(scalars)
        if samples:
            data["samples"] = self.wandb.Table(columns=list(SAMPLE_COLUMNS),
                                               data=[[s[c] for c in SAMPLE_COLUMNS] for s in samples])
        self.run.log(data, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status in ("FINISHED", "KILLED") else 1)


class MlflowSink:
    """An MLflow run in `logging.mlflow_experiment`, in a local SQLite store under the run directory unless a
    tracking URI is given. Its run id is kept in the checkpoint; a resumed run logs to the same run."""

    name = "mlflow"
    rewinds = False  # MLflow appends: a step logged twice would show twice, so the tracker never does it
    buffered = False  # each log_batch is written to the store before it returns

    def __init__(self, cfg: Config, run_path: Path, run_id: str | None) -> None:
        _require("mlflow", self.name)
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store set-up logs at INFO
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        lc = cfg.logging
        local = lc.mlflow_tracking_uri is None
        self.uri = mlflow_uri(cfg, run_path)
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(lc.mlflow_experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            lc.mlflow_experiment, artifact_location=(run_path / "mlflow-artifacts").resolve().as_uri() if local
            else None)
        if run_id is not None:
            self.run_id = self.client.get_run(run_id).info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=cfg.run_name,
                                                 tags={"orz.run_dir": str(run_path)}).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in _flat(public_config(cfg)).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])

    def ids(self) -> dict:
        return {"mlflow_run_id": self.run_id, "mlflow_tracking_uri": self.uri}

    def last_step(self) -> int:
        """The highest step of the run's step-time metric in the store (0 for a new run)."""
        history = self.client.get_metric_history(self.run_id, "time/step_time_s")
        return max((m.step for m in history), default=0)

    def log(self, step: int, scalars: dict[str, float], samples: list[dict]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = [Metric(k, v, ts, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        if samples:
            self.client.log_table(self.run_id, {c: [s[c] for s in samples] for c in SAMPLE_COLUMNS},
                                  f"samples/step_{step:06d}.json")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def public_config(cfg: Config) -> dict:
    """The resolved config as a tracker records it: secrets (the Redis password, the reward token) redacted."""
    d = cfg.model_dump(mode="json")
    for key in SECRETS:
        section, name = key.split(".")
        if d[section].get(name) is not None:
            d[section][name] = "<redacted>"
    return d


def mlflow_uri(cfg: Config, run_path: Path) -> str:
    """`logging.mlflow_tracking_uri`, or the run directory's own SQLite store."""
    return cfg.logging.mlflow_tracking_uri or f"sqlite:///{(run_path / 'mlflow.db').resolve()}"


def _flat(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out

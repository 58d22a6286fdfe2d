"""`orz learner`: feed prompts, collect trajectory groups, train PPO, broadcast weights, repeat.

One step is `Learner._step` (docs/architecture.md, "One step"): a batch of fresh groups in hand
(learner/intake.py), one PPO iteration (learner/trainer.py), the new policy version published and broadcast
(services/membership.py), the groups acked, a metrics record (learner/telemetry.py); every `checkpoint_every`
steps a resumable checkpoint (learner/checkpoint.py). Under `torchrun --nproc-per-node K` (learner/parallel.py)
rank 0 does all of that and the other ranks only train their share of each batch.

Resuming (`--resume`) starts from the newest complete checkpoint: actor, critic, optimisers, schedules and
RNG states, the policy version, the dataset cursor and the tasks already trained or dropped. The streams are
reset and the prompts in flight at the checkpoint are fed again first, so no task is trained twice; the
generators receive the resumed weights before the first step.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import redis
import torch

from learner import checkpoint as ckpt
from learner import parallel
from learner.backend import Backend, TorchBackend
from learner.evaluation import InTrainingEval
from learner.feeder import Feeder
from learner.intake import Intake
from learner.plot import plot_curves
from learner.telemetry import (
    LearnerMetrics,
    StepRecord,
    export,
    export_queues,
    generator_activity,
    json_safe,
    log_step,
    scalars,
    source_figures,
    step_record,
)
from learner.tracking import Tracker, sample_rows
from services.config import SINKS, Config
from services.control import CheckpointPointer, ControlPlane, Keys
from services.memory import HeapTrimmer, keep_freed_memory
from services.metrics import MetricsServer
from services.plan import warn_if_it_will_not_fit
from services.protocol import TrajectoryGroup
from services.queue import eval_queue, prompt_queue, trajectory_queue
from services.redis_client import connect_cfg

log = logging.getLogger("orz.learner")



class Learner:
    def __init__(self, cfg: Config, resume: bool | str = False, backend: Backend | None = None) -> None:
        """`resume`: True continues from the newest checkpoint (which must exist); "auto" does so when one
        exists and starts fresh otherwise (a restarted Kubernetes pod). `backend`: the models and their
        training (learner/backend.py); the simulation passes a cost model."""
        self.cfg = cfg
        keep_freed_memory()  # message-sized blocks reuse pages instead of faulting new ones in
        lc = cfg.learner
        self.dtype = lc.compute_dtype(torch.cuda.is_available())
        self.dp = parallel.init_from_env(mixed_precision=self.dtype == "bfloat16")
        torch.manual_seed(lc.seed)
        torch.set_num_threads(lc.threads)
        self.run_path = cfg.run_path
        self.ckpt_root = self.run_path / "checkpoints"
        self.stop_event = threading.Event()
        self.version = 0
        self.step = 0
        self.resume_from: Path | None = None
        self.resume_state: dict | None = None
        if resume:
            self.resume_from = ckpt.latest(self.ckpt_root)
            if self.resume_from is None and resume != "auto":
                raise FileNotFoundError(f"--resume: no complete checkpoint under {self.ckpt_root}")
            if self.resume_from is None:
                log.info("--auto-resume: no checkpoint under %s yet; starting fresh", self.ckpt_root)
        if self.resume_from is not None:
            self.resume_state = ckpt.read_state(self.resume_from)
            self.version, self.step = int(self.resume_state["version"]), int(self.resume_state["step"])

        self.backend = backend or TorchBackend(cfg, self.dp, self.resume_from)
        self.tokenizer = self.backend.tokenizer
        if self.dp.is_main:
            self._init_rank0()

    def _init_rank0(self) -> None:
        """Redis, the queues, the metrics, the run directory and the feeder: rank 0's share of the work."""
        cfg = self.cfg
        self.run_path.mkdir(parents=True, exist_ok=True)
        self.keys = Keys(cfg.namespace)
        self.redis = connect_cfg(cfg.redis)
        self.control = ControlPlane(self.redis, self.keys)
        self.metrics = LearnerMetrics()
        self.prompts = prompt_queue(self.redis, self.keys)
        self.trajectories = trajectory_queue(self.redis, self.keys)
        self.evals = eval_queue(self.redis, self.keys)
        consumed: set[str] = set()
        if self.resume_state is not None:
            st = self.resume_state
            ckpt.truncate(self.run_path / "tasks.jsonl", st["feeder"]["ledger_offset"])
            ckpt.truncate(self.run_path / "metrics.jsonl", st["metrics_offset"])
            (self.run_path / "STOPPED").unlink(missing_ok=True)
            consumed = set(st["consumed"])
        else:  # a fresh run under an existing name starts its logs over
            for name in ("metrics.jsonl", "tasks.jsonl", "DONE", "STOPPED"):  # the trackers' files: Tracker
                (self.run_path / name).unlink(missing_ok=True)
        self.feeder = Feeder(cfg, self.prompts, self.tokenizer, self.run_path / "tasks.jsonl")
        if self.resume_state is not None:
            self.feeder.restore(self.resume_state["feeder"])
            log.info("resuming from %s: step %d, version %d, %d prompts to feed again", self.resume_from,
                     self.step, self.version, len(self.resume_state["feeder"]["pending"]))
        self.intake = Intake(cfg, self.prompts, self.trajectories, self.feeder, self.control, self.metrics,
                             self.stop_event, consumed)
        self.metrics.init_labels(self.feeder.source_labels, list(SINKS))
        # before any thread starts: a tracker that cannot start (a missing library, W&B online without a key)
        # stops the learner here, with its message
        resumed = self.resume_state is not None
        self.tracker = Tracker(cfg, self.run_path, self.resume_state.get("tracking") if resumed else None,
                               self.step if resumed else None,
                               lambda sink: self.metrics.tracking_errors.labels(sink).inc())

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _checkpoint(self, actor_state: dict[str, torch.Tensor], metrics_offset: int) -> None:
        """Every rank joins (optimiser states are gathered); rank 0 writes and commits the directory."""
        trainer_state, critic_state = self.backend.checkpoint_state()
        if not self.dp.is_main:
            return
        t0 = time.time()
        tmp = ckpt.tmp_dir_for(self.ckpt_root, self.step)
        self.backend.save_models(tmp, actor_state, critic_state)
        if trainer_state is not None:
            ckpt.save_trainer(tmp, trainer_state)
        ckpt.write_state(tmp, {
            "step": self.step, "version": self.version, "feeder": self.feeder.state(),
            "consumed": sorted(self.intake.consumed), "metrics_offset": metrics_offset,
            "advantage": self.cfg.learner.advantage, "tracking": self.tracker.checkpoint_state(),
        })
        final = ckpt.commit(tmp, self.ckpt_root, self.step, self.cfg.learner.keep_checkpoints)
        self._publish_checkpoint(final)
        log.info("checkpoint %s written in %.2f s", final, time.time() - t0)

    def _publish_checkpoint(self, path: Path) -> None:
        """Where a generator that joins late finds the newest weights on disk (generator/worker.py)."""
        self.control.publish_checkpoint(CheckpointPointer(str(path.resolve()), self.version))

    # -- rank 0: Redis, feeding, collecting -----------------------------------------------------------------
    def _reset_namespace(self) -> None:
        """Every run (fresh or resumed) starts from empty streams; a resumed one re-feeds its in-flight prompts."""
        self.control.reset()
        for queue in (self.prompts, self.trajectories, self.evals):
            queue.ensure_group()
        if self.resume_from is not None:
            self._publish_checkpoint(self.resume_from)

    # -- the loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        # Resumed: generators start from the base model, so rank 0 sends them the resumed weights first
        # (gathered here, on every rank, as a collective when sharded).
        self._latest_state = self.backend.actor_state()  # what a generator joining before the next step receives
        if not self.dp.is_main:
            try:
                self._follow()
            finally:
                parallel.close(self.dp)
            return
        lc = self.cfg.learner
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        server = MetricsServer(self.metrics.registry, lc.metrics_port, host=lc.metrics_host,
                               health=lambda: {"status": "ok", "version": self.version, "step": self.step})
        log.info("learner: metrics on :%d, run dir %s, %s advantages, %d rank(s)", server.port, self.run_path,
                 lc.advantage, self.dp.world)
        self._reset_namespace()
        self.evaluator = InTrainingEval(self.cfg, self.tokenizer, self.prompts, self.evals) if lc.eval_every else None
        self.weights = self.backend.weight_group(self.cfg, self.control, lambda _: self.metrics.slow_peers.inc())
        self._last_sync = 0.0
        self.intake.vocab_size = self.backend.vocab_size
        self.heap = HeapTrimmer()
        self.control.set_policy_version(self.version)
        self.feeder.top_up(self.version)

        metrics_path = self.run_path / "metrics.jsonl"
        history = [scalars(json.loads(x)) for x in metrics_path.read_text().splitlines()] \
            if metrics_path.exists() else []
        self._metrics_file, self._history = metrics_path.open("a"), history
        self._samples: dict[int, list[dict]] = {}  # step → its sample completions, logged with its record
        status = "FAILED"
        self._unwritten: list[StepRecord] = []  # step records waiting for their evaluation (learner/evaluation.py)
        self._eval_due: set[int] = set()  # steps whose evaluation is out
        self._dropped_total = history[-1]["dropped_stale_total"] if history else 0
        self._filtered_total = history[-1].get("filtered_groups_total", 0) if history else 0
        resumable_exit = False  # stopping to be resumed: generators must wait for the next group, not stop
        try:
            while self.step < lc.total_steps:
                record, actor_state = self._step(self.step + 1)
                step = record["step"]
                if lc.eval_every and (step % lc.eval_every == 0 or step == lc.total_steps):
                    self.evaluator.start(step, self.version)
                    self._eval_due.add(step)
                self._unwritten.append(record)
                checkpoint = lc.checkpoint_every and (step % lc.checkpoint_every == 0 or step == lc.total_steps)
                self._write_records(wait=checkpoint or step == lc.total_steps)
                self.heap.maybe()
                export(self.metrics, record)
                export_queues(self.metrics, {"prompts": self.prompts, "trajectories": self.trajectories},
                              self.control)
                log_step(record, lc.total_steps)
                if checkpoint:
                    parallel.send_command(self.dp, parallel.CMD_CHECKPOINT)
                    self._checkpoint(actor_state, self._metrics_file.tell())
                if step % 10 == 0:
                    plot_curves(history, self.run_path / "curves.png")
            parallel.send_command(self.dp, parallel.CMD_FINAL)
            self.backend.save_models(self.run_path / "checkpoints" / "final", *self.backend.final_states())
            self._write_accounting(self.run_path / "DONE")
            status = "FINISHED"
        except KeyboardInterrupt:
            log.info("learner interrupted at version %d", self.version)
            self._write_records(wait=False, all_of_them=True)
            self._write_accounting(self.run_path / "STOPPED")
            status = "KILLED"
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Every call already retried for redis.retry_s: Redis is gone, or this host is cut off from it.
            log.error("Redis unreachable for longer than redis.retry_s (%g s) during step %d (%s): stopping; "
                      "--resume continues from the newest checkpoint", self.cfg.redis.retry_s, self.step + 1, exc)
            resumable_exit = True
            raise SystemExit(3) from None
        finally:
            parallel.send_command(self.dp, parallel.CMD_STOP)
            if history:
                plot_curves(history, self.run_path / "curves.png")
            self._metrics_file.close()
            self.tracker.close(status)
            self.feeder.close()
            self.weights.stop(for_good=not resumable_exit)
            server.close()
            parallel.close(self.dp)

    def _step(self, step: int) -> tuple[StepRecord, dict[str, torch.Tensor]]:
        """One step: a batch of fresh groups in hand, one PPO iteration, the new version published and
        broadcast, the groups acked and marked trained, the next prompts fed. Returns the step's record
        (a metrics.jsonl line) and the new weights."""
        t_start = time.time()
        drops: list[str] = []
        filtered: list[str] = []
        batch, to_ack = self.intake.collect(step, self.version, drops, self._sync_joiners, self._rewrite_keys,
                                            filtered)
        self._filtered_total += len(filtered)
        if len(batch) < self.cfg.learner.batch_prompts:
            self.metrics.short_batches.inc()
            log.warning("step %d trains on %d of %d groups: %d filtered this step (learner.max_oversample)", step,
                        len(batch), self.cfg.learner.batch_prompts, len(filtered))
        self._dropped_total += len(drops)
        t_collected = time.time()
        groups = [g for _, g in batch]
        parallel.send_command(self.dp, parallel.CMD_BATCH, groups)
        stats = self.backend.train(groups)
        self.version += 1
        self.step = step
        actor_state = self.backend.actor_state()
        self.control.set_policy_version(self.version)
        self._latest_state = actor_state
        t_trained = time.time()
        broadcast_s = self.weights.sync(self.version, actor_state) or 0.0
        self._last_sync = time.time()
        self.trajectories.ack([eid for eid, _ in batch] + to_ack)
        # Acked entries would otherwise stay in Redis's memory for the whole run (~1 MB per group).
        self.trajectories.trim_acked()
        self.prompts.trim_acked()
        for _, g in batch:
            self.feeder.record("trained", g.task_id, step)
        self.feeder.top_up(self.version)  # the next prompts go out before logging and checkpointing
        record = self._record(step, groups, stats, drops, (t_start, t_collected, t_trained), broadcast_s)
        record.update(filtered_groups=len(filtered), filtered_groups_total=self._filtered_total)
        record["sources"] = source_figures(groups, self.feeder.source_of)
        lg = self.cfg.logging
        self._samples[step] = sample_rows(step, groups, self.tokenizer.decode, lg.samples_per_step, lg.sample_chars,
                                          self.feeder.source_of)
        return record, actor_state

    def _write_records(self, wait: bool, all_of_them: bool = False) -> None:
        """Appends the step records whose evaluation is in (or that have none) to metrics.jsonl, in step order.
        `wait`: wait for the evaluations still out (a checkpoint's metrics offset covers every step before it);
        `all_of_them`: write every record now, with or without its evaluation (the learner is stopping)."""
        while self._unwritten:
            record = self._unwritten[0]
            if record["step"] in self._eval_due:
                fields = self.evaluator.result(record["step"], self.cfg.learner.wait_timeout_s if wait else 0.0,
                                               self.stop_event) if not all_of_them else None
                if fields is None and not all_of_them:
                    return
                self._eval_due.discard(record["step"])
                record.update(fields or {})
                if "eval_accuracy" in record:
                    self.metrics.eval_accuracy.set(record["eval_accuracy"])
                for label, accuracy in record.get("eval_source_accuracy", {}).items():
                    self.metrics.source_eval.labels(source=label).set(accuracy)
            # trackers first: once a step's line is in metrics.jsonl, every tracker has the step
            self.tracker.log(record, self._samples.pop(record["step"], []))
            self._metrics_file.write(json.dumps(json_safe(record)) + "\n")
            self._metrics_file.flush()
            self._history.append(scalars(record))
            self._unwritten.pop(0)

    def _sync_joiners(self) -> None:
        """While a step waits for groups: generators that joined (or came back) get the weights, once a second."""
        if time.time() - self._last_sync > 1.0:
            self.weights.sync(self.version, self._latest_state)
            self._last_sync = time.time()

    def _rewrite_keys(self) -> None:
        """After a Redis restart: the keys the learner owns, written again."""
        self.control.set_policy_version(self.version)
        self.weights.republish()

    def _record(self, step: int, groups: list[TrajectoryGroup], stats: dict, drops: list[str],
                times: tuple[float, float, float], broadcast_s: float) -> StepRecord:
        record = step_record(step, self.version, self.cfg.learner.advantage, groups, stats, drops,
                             self._dropped_total, times, broadcast_s, self.feeder.inflight, self.weights.members,
                             generator_activity(self.control))
        record.update(self.backend.step_fields())
        return record

    def _write_accounting(self, path: Path) -> None:
        """Where every task stands when the learner ends (DONE) or is stopped (STOPPED): the tasks still in
        flight, and those of them found in neither stream (lost; the fault-injection tests require none).
        A task is in flight until it is trained or dropped (the feeder's `pending`), including those a step
        interrupted by the stop had read into its batch (`consumed`, but never trained)."""
        inflight = list(self.feeder.pending)
        try:
            unaccounted = self.intake.unaccounted(in_hand=True)
        except Exception as exc:  # Redis gone at shutdown: say so rather than claim all is well
            unaccounted = [f"unknown: {exc}"]
        path.write_text(json.dumps({
            "steps": self.step, "version": self.version, "inflight": inflight, "unaccounted": unaccounted,
            "dead_lettered": self.trajectories.dead_lettered,
            "duplicates": int(self.metrics.duplicates._value.get()),
        }))

    def _follow(self) -> None:
        """Ranks > 0: train on the shares rank 0 sends, join its gathers, until told to stop."""
        while True:
            cmd, groups = parallel.receive_command(self.dp)
            if cmd == parallel.CMD_STOP:
                return
            if cmd == parallel.CMD_FINAL:
                self.backend.final_states()
                continue
            if cmd == parallel.CMD_CHECKPOINT:
                self._checkpoint({}, 0)
                continue
            self.backend.train(groups)
            self.version += 1
            self.step += 1
            self.backend.actor_state()

def run(cfg: Config, resume: bool | str = False) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        warn_if_it_will_not_fit(cfg, log)
    learner = Learner(cfg, resume)
    learner.run()
    parallel.end_process(learner.dp)

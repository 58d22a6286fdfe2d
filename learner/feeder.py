"""The feeder: owns the dataset cursor and keeps the prompt stream topped up (ARCHITECTURE.md, step 1).

Admission control (AReaL's rule): at most `max_inflight_prompts` = batch_prompts × (max_staleness + 1)
prompts are fed and not yet trained or dropped, where a batch counts as trained only once its step is
done and the version has advanced. So the prompts fed at version v are trained by version
v + max_staleness at the latest, and stale drops stay rare. (Freeing capacity as soon as a group is read
would let the feeder refill at the old version mid-step, and those prompts arrive one version too late.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from services.config import Config
from services.protocol import PromptTask, SamplingParams
from services.queue import StreamQueue
from services.tasks import all_problems, split, train_stream


class Feeder:
    def __init__(self, cfg: Config, queue: StreamQueue, tokenizer, ledger_path: Path) -> None:
        tc = cfg.task
        self.cfg = cfg
        self.queue = queue
        self.tokenizer = tokenizer
        train, _ = split(all_problems(tc.min_terms, tc.max_terms, tc.max_operand))
        self._stream = train_stream(train, tc.seed)
        s = cfg.sampling
        self.sampling = SamplingParams(s.temperature, s.top_p, s.max_tokens, tuple(s.stop))
        self.fed = 0
        self.trained = 0  # groups of completed steps
        self.dropped = 0  # groups dropped as stale
        self._ledger: TextIO = ledger_path.open("a")

    @property
    def inflight(self) -> int:
        return self.fed - self.trained - self.dropped

    def top_up(self, version: int) -> int:
        """Adds prompts until `max_inflight_prompts` are in flight; returns how many were added."""
        added = 0
        while self.inflight < self.cfg.max_inflight_prompts:
            problem = next(self._stream)
            task = PromptTask(
                task_id=f"{self.fed:08d}:{problem.task_id}", prompt=problem.prompt, reference=str(problem.answer),
                task_type=self.cfg.task.task_type, n_samples=self.cfg.learner.n_samples, sampling=self.sampling,
                feed_version=version,
                prompt_ids=tuple(self.tokenizer.encode(problem.prompt, add_special_tokens=False)),
            )
            self.queue.add(task)
            self._ledger.write(json.dumps({"event": "fed", "task_id": task.task_id, "version": version}) + "\n")
            self.fed += 1
            added += 1
        self._ledger.flush()
        return added

    def record(self, event: str, task_id: str, step: int) -> None:
        self._ledger.write(json.dumps({"event": event, "task_id": task_id, "step": step}) + "\n")

    def close(self) -> None:
        self._ledger.close()

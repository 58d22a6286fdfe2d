"""The feeder: owns the dataset cursor and keeps the prompt stream topped up (docs/architecture.md, "One step", 1).

Admission control (AReaL's rule): at most `max_inflight_prompts` = batch_prompts × (max_staleness + 1)
prompts are fed and not yet trained or dropped, where a batch counts as trained only once its step is
done and the version has advanced. So the prompts fed at version v are trained by version
v + max_staleness at the latest, and stale drops stay rare. (Freeing capacity as soon as a group is read
would let the feeder refill at the old version mid-step, and those prompts arrive one version too late.)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TextIO

from learner.mixture import PromptStream, source_of
from services.config import Config
from services.protocol import PromptTask, SamplingParams
from services.queue import StreamQueue

log = logging.getLogger("orz.feeder")


class Feeder:
    """Feeds prompts and keeps the ledger `tasks.jsonl` (one line per fed / refed / trained / dropped task).

    Its resumable state (`state()` / `restore()`) is the dataset cursor (how many problems were taken from the
    seeded stream, and from each source of a mixture: learner/mixture.py), the counters, and the prompts in
    flight, which a resumed run feeds again first.
    """

    source_of = staticmethod(source_of)

    def __init__(self, cfg: Config, queue: StreamQueue, tokenizer, ledger_path: Path) -> None:
        self.cfg = cfg
        self.queue = queue
        self.tokenizer = tokenizer
        self._stream = PromptStream(cfg)
        s = cfg.sampling
        self.sampling = SamplingParams(s.temperature, s.top_p, s.max_tokens, tuple(s.stop))
        self.fed = 0  # problems taken from the stream (the cursor)
        self.trained = 0  # groups of completed steps
        self.dropped = 0  # groups dropped as stale
        self.filtered = 0  # groups filtered out (learner.filter_groups)
        self.pending: dict[str, PromptTask] = {}  # fed, not yet trained or dropped, in feed order
        self._refeed: list[PromptTask] = []
        self.ledger_path = ledger_path
        self._ledger: TextIO = ledger_path.open("a")

    @property
    def source_labels(self) -> list[str]:
        return self._stream.source_labels

    @property
    def inflight(self) -> int:
        return len(self.pending)

    def _next_task(self, version: int) -> tuple[PromptTask, bool]:
        if self._refeed:
            old = self._refeed.pop(0)
            return PromptTask(task_id=old.task_id, prompt=old.prompt, reference=old.reference,
                              task_type=old.task_type, n_samples=old.n_samples, sampling=old.sampling,
                              feed_version=version, prompt_ids=old.prompt_ids, with_texts=old.with_texts), True
        skipped = 0
        while True:
            item = next(self._stream)
            self.fed += 1
            ids = tuple(self.tokenizer.encode(item.prompt, add_special_tokens=False))
            if self.cfg.task.kind == "toy_arith" or len(ids) <= self.cfg.task.max_prompt_tokens:
                break
            log.warning("skipped %s: prompt of %d tokens is over task.max_prompt_tokens", item.task_id, len(ids))
            skipped += 1
            if skipped >= len(self._stream):
                raise ValueError(f"every training prompt is over task.max_prompt_tokens "
                                 f"({self.cfg.task.max_prompt_tokens}); raise it or shorten the template")
        task = PromptTask(
            task_id=f"{self.fed - 1:08d}:{item.task_id}", prompt=item.prompt, reference=item.reference,
            task_type=item.task_type, n_samples=self.cfg.learner.n_samples, sampling=self.sampling,
            feed_version=version, prompt_ids=ids, with_texts=self._with_texts(),
        )
        return task, False

    def top_up(self, version: int) -> int:
        """Adds prompts until `max_inflight_prompts` are in flight (one pipelined round trip); returns how many."""
        tasks = []
        while self.inflight + len(tasks) < self.cfg.max_inflight_prompts:
            tasks.append(self._next_task(version))
        if not tasks:
            return 0
        self.queue.add_many([task for task, _ in tasks])
        for task, refed in tasks:
            self.pending[task.task_id] = task
            event = "refed" if refed else "fed"
            self._ledger.write(json.dumps({"event": event, "task_id": task.task_id, "version": version}) + "\n")
        self._ledger.flush()
        return len(tasks)

    def _with_texts(self) -> bool:
        """Whether the prompt drawn last asks for its response texts: `logging.samples_per_step` of every
        `batch_prompts` prompts do, the completions the learner logs. The rest travel as token ids only."""
        return (self.fed - 1) % self.cfg.learner.batch_prompts < self.cfg.logging.samples_per_step

    def refeed(self, task_ids: list[str], version: int, reason: str) -> None:
        """Feed in-flight tasks again, at once and under the same ids: their prompts were lost (a Redis restart
        that lost its last writes) or their group was rejected. A copy that still turns up is a duplicate,
        which the learner drops by task id."""
        for task_id in task_ids:
            old = self.pending[task_id]
            task = PromptTask(task_id=old.task_id, prompt=old.prompt, reference=old.reference,
                              task_type=old.task_type, n_samples=old.n_samples, sampling=old.sampling,
                              feed_version=version, prompt_ids=old.prompt_ids, with_texts=old.with_texts)
            self.queue.add(task)
            self.pending[task_id] = task
            self._ledger.write(json.dumps({"event": "refed", "task_id": task_id, "version": version,
                                           "reason": reason}) + "\n")
        self._ledger.flush()

    def record(self, event: str, task_id: str, step: int, **extra: int) -> None:
        """`trained`, `dropped_stale` or `filtered` (its group carried no signal: learner.filter_groups): the
        task leaves the in-flight set, and its slot frees for the next prompt. `extra` goes into the ledger
        line (a stale drop's policy versions: where its staleness came from)."""
        if self.pending.pop(task_id, None) is not None:
            if event == "trained":
                self.trained += 1
            elif event == "filtered":
                self.filtered += 1
            else:
                self.dropped += 1
        self._ledger.write(json.dumps({"event": event, "task_id": task_id, "step": step, **extra}) + "\n")

    def state(self) -> dict:
        self._ledger.flush()
        return {
            "fed": self.fed, "trained": self.trained, "dropped": self.dropped, "filtered": self.filtered,
            "ledger_offset": self.ledger_path.stat().st_size, "stream": self._stream.state(),
            "pending": [{"task_id": t.task_id, "prompt": t.prompt, "reference": t.reference,
                         "task_type": t.task_type, "n_samples": t.n_samples, "prompt_ids": list(t.prompt_ids or ())}
                        for t in self.pending.values()],
        }

    def restore(self, state: dict) -> None:
        """Back to a checkpoint: same cursor, and the prompts in flight then are fed again first."""
        self.fed = int(state["fed"])
        self.trained, self.dropped = int(state["trained"]), int(state["dropped"])
        self.filtered = int(state.get("filtered", 0))
        # a checkpoint from before mixtures: one source, its cursor the number fed
        self._stream.restore(state.get("stream") or {"draws": self.fed,
                                                     "cursors": {self._stream.labels[0]: self.fed}})
        self.pending = {}
        self._refeed = [
            PromptTask(task_id=p["task_id"], prompt=p["prompt"], reference=p["reference"], task_type=p["task_type"],
                       n_samples=p["n_samples"], sampling=self.sampling, feed_version=0,
                       prompt_ids=tuple(p["prompt_ids"]) or None)
            for p in state["pending"]
        ]

    def close(self) -> None:
        self._ledger.close()


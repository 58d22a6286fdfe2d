"""In-training evaluation (`learner.eval_every`), sampled by the generators.

At an eval step the learner feeds the held-out problems (the toy task's, the first `eval_size` of `eval_bench`, or
the first `eval_size` of each `task.sources` entry's `eval_path`, reported per source) through the prompt stream
as eval prompts: `PromptTask.eval_round` is the step, the sampling is the eval settings (`eval.temperature`,
`eval.max_tokens`, one sample each) and the feed version is the step's policy version, so a generator samples them
with that step's weights or newer, never older. Generators grade them like any prompt and answer with an
`EvalResult` on `{ns}:evals` instead of a trajectory group: eval prompts are never trained on and are not in the
feeder's ledger. The accuracy (mean reward) goes into that step's metrics.jsonl record (`eval_accuracy`, with the
policy versions the samples came from) and into `orz_learner_eval_accuracy`; the learner writes the record once
its round is complete, and waits for it (up to `learner.wait_timeout_s`) before a checkpoint and at the end of the
run.
"""

from __future__ import annotations

import logging
import threading
import time

from learner.mixture import eval_items, source_of
from services.config import Config
from services.datasets import bench_records, render, template
from services.protocol import EvalResult, PromptTask, SamplingParams
from services.queue import StreamQueue
from services.tasks import all_problems, eval_set

log = logging.getLogger("orz.learner")

CONSUMER = "learner-0"


class InTrainingEval:
    def __init__(self, cfg: Config, tokenizer, prompts: StreamQueue[PromptTask],
                 results: StreamQueue[EvalResult]) -> None:
        lc, tc, ec = cfg.learner, cfg.task, cfg.eval
        self.sources: list[str] = []  # each item's source, when evaluating per source
        if lc.eval_bench:
            bench, records = bench_records(lc.eval_bench, lc.eval_size)
            text = template(tc.template)
            self.items = [(render(text, r.question), r.answer, bench.task_type) for r in records]
        elif any(s.eval_path for s in tc.sources):
            rows = eval_items(cfg, lc.eval_size)
            self.items = [(r.prompt, r.reference, r.task_type) for r in rows]
            self.sources = [source_of(r.task_id) for r in rows]
        else:
            problems = eval_set(all_problems(tc.min_terms, tc.max_terms, tc.max_operand), lc.eval_size, tc.seed)
            self.items = [(p.prompt, str(p.answer), tc.task_type) for p in problems]
        self.ids = [tuple(tokenizer.encode(prompt, add_special_tokens=False)) for prompt, _, _ in self.items]
        self.params = SamplingParams(ec.temperature, 1.0, ec.max_tokens, tuple(cfg.sampling.stop))
        self.prompts, self.results = prompts, results
        self.rounds: dict[int, dict[str, EvalResult]] = {}  # step → task id → its result, while incomplete
        self.started: dict[int, float] = {}

    def start(self, step: int, version: int) -> None:
        """Feeds the eval prompts of the evaluation at `step`, to be sampled with weights ≥ `version`."""
        self.rounds[step], self.started[step] = {}, time.time()
        self.prompts.add_many(
            PromptTask(task_id=f"eval-{step:06d}-{i:05d}", prompt=prompt, reference=answer, task_type=task_type,
                       n_samples=1, sampling=self.params, feed_version=version, prompt_ids=ids, eval_round=step)
            for i, ((prompt, answer, task_type), ids) in enumerate(zip(self.items, self.ids)))

    def poll(self) -> None:
        """Takes in what the generators published (a duplicate of a reclaimed prompt counts once)."""
        while entries := self.results.read(CONSUMER, 256):
            for _, result in entries:
                got = self.rounds.get(result.eval_round)
                if got is not None and result.task_id.startswith(f"eval-{result.eval_round:06d}-"):
                    got.setdefault(result.task_id, result)
            self.results.ack([eid for eid, _ in entries])
            self.results.trim_acked()

    def result(self, step: int, wait_s: float = 0.0, stop: threading.Event | None = None) -> dict | None:
        """The fields the evaluation at `step` adds to that step's record, once all its prompts are answered;
        None while it is incomplete. `wait_s` > 0: wait that long for it, then report what has arrived."""
        deadline = time.time() + wait_s
        while True:
            self.poll()
            got = self.rounds[step]
            if len(got) == len(self.items) or time.time() >= deadline or (stop is not None and stop.is_set()):
                break
            time.sleep(0.05)
        if len(got) < len(self.items) and wait_s <= 0:
            return None
        del self.rounds[step]
        seconds = time.time() - self.started.pop(step)
        if not got:
            log.warning("in-training eval of step %d: no results in %.0f s", step, seconds)
            return {"eval_missing": len(self.items)}
        rewards = [r for res in got.values() for r in res.rewards]
        versions = [v for res in got.values() for v in (res.policy_version, res.policy_version_last)]
        fields = {"eval_accuracy": sum(rewards) / len(rewards), "eval_problems": len(got),
                  "eval_policy_versions": [min(versions), max(versions)],
                  "eval_truncated_frac": sum(res.truncated for res in got.values()) / len(rewards)}
        if self.sources:
            per: dict[str, list[float]] = {}
            for task_id, res in got.items():
                per.setdefault(self.sources[int(task_id.rsplit("-", 1)[1])], []).extend(res.rewards)
            fields["eval_source_accuracy"] = {label: sum(r) / len(r) for label, r in sorted(per.items())}
        if len(got) < len(self.items):
            fields["eval_missing"] = len(self.items) - len(got)
            log.warning("in-training eval of step %d: %d of %d problems answered in %.0f s", step, len(got),
                        len(self.items), seconds)
        log.info("in-training eval of step %d: accuracy %.3f on %d problems (weights v%d–v%d, %.1f s)", step,
                 fields["eval_accuracy"], len(got), *fields["eval_policy_versions"], seconds)
        return fields

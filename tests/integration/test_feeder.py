"""The feeder's admission control against a real Redis: capacity frees only when steps complete."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from learner.base_model import train_tokenizer
from learner.feeder import Feeder
from services.config import Config
from services.protocol import PromptTask
from services.queue import Keys, StreamQueue
from services.redis_server import connect
from services.tasks import all_problems, split


def _tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer([p.prompt + p.response() for p in all_problems(2, 2, 9)], 300)


def test_admission_control_and_ledger(redis_url: str, tmp_path: Path) -> None:
    cfg = Config.model_validate({"run_name": "feed", "learner": {"batch_prompts": 4, "max_staleness": 1}})
    client = connect(redis_url)
    keys = Keys(cfg.namespace)
    queue = StreamQueue(client, keys.prompts, "generators", PromptTask, keys.dead)
    queue.ensure_group()
    feeder = Feeder(cfg, queue, _tokenizer(), tmp_path / "tasks.jsonl")

    assert feeder.top_up(version=0) == 8  # batch_prompts × (max_staleness + 1)
    assert feeder.top_up(version=0) == 0  # nothing frees capacity until a step completes
    entries = queue.read("g", 100, 100)
    assert len(entries) == 8
    assert feeder.top_up(version=0) == 0  # reading (generating) does not free capacity either
    feeder.trained += 4  # a step finished with 4 groups
    assert feeder.top_up(version=1) == 4
    feeder.dropped += 1  # a stale group frees its slot at once
    assert feeder.top_up(version=1) == 1

    tasks = [t for _, t in entries] + [t for _, t in queue.read("g", 100, 100)]
    assert len({t.task_id for t in tasks}) == 13  # unique ids even when a problem repeats across epochs
    _, heldout = split(all_problems(cfg.task.min_terms, cfg.task.max_terms, cfg.task.max_operand))
    assert not {t.prompt for t in tasks} & {p.prompt for p in heldout}  # held-out problems are never fed
    assert all(t.n_samples == cfg.learner.n_samples and t.prompt_ids for t in tasks)
    assert [t.feed_version for t in tasks] == [0] * 8 + [1] * 5
    feeder.close()
    ledger = [json.loads(line) for line in (tmp_path / "tasks.jsonl").read_text().splitlines()]
    assert [e["task_id"] for e in ledger if e["event"] == "fed"] == [t.task_id for t in tasks]

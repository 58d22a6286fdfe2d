"""The feeder's admission control against a real Redis: capacity frees only when steps complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from learner.base_model import train_tokenizer
from learner.feeder import Feeder
from services.config import Config
from services.control import Keys
from services.datasets import DataError
from services.protocol import PromptTask
from services.queue import StreamQueue
from services.redis_client import connect
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
    for _, t in entries[:4]:  # a step finished with 4 groups
        feeder.record("trained", t.task_id, step=1)
    assert feeder.top_up(version=1) == 4
    feeder.record("dropped_stale", entries[4][1].task_id, step=2)  # a stale group frees its slot at once
    assert feeder.top_up(version=1) == 1
    feeder.record("trained", entries[0][1].task_id, step=2)  # already trained: frees nothing, counts nothing
    assert feeder.top_up(version=1) == 0 and (feeder.trained, feeder.dropped) == (4, 1)

    tasks = [t for _, t in entries] + [t for _, t in queue.read("g", 100, 100)]
    assert len({t.task_id for t in tasks}) == 13  # unique ids even when a problem repeats across epochs
    _, heldout = split(all_problems(cfg.task.min_terms, cfg.task.max_terms, cfg.task.max_operand))
    assert not {t.prompt for t in tasks} & {p.prompt for p in heldout}  # held-out problems are never fed
    assert all(t.n_samples == cfg.learner.n_samples and t.prompt_ids for t in tasks)
    assert [t.feed_version for t in tasks] == [0] * 8 + [1] * 5
    feeder.close()
    ledger = [json.loads(line) for line in (tmp_path / "tasks.jsonl").read_text().splitlines()]
    assert [e["task_id"] for e in ledger if e["event"] == "fed"] == [t.task_id for t in tasks]


def test_restore_feeds_inflight_prompts_again_then_continues_the_stream(redis_url: str, tmp_path: Path) -> None:
    """A checkpoint's feeder state, restored into a new feeder: the in-flight prompts come first (same ids, the
    new version), then exactly the prompts an uninterrupted feeder would have fed next."""
    cfg = Config.model_validate({"run_name": "refeed", "learner": {"batch_prompts": 3, "max_staleness": 1}})
    client = connect(redis_url)
    keys = Keys(cfg.namespace)
    queue = StreamQueue(client, keys.prompts, "generators", PromptTask, keys.dead)
    queue.ensure_group()
    tok = _tokenizer()

    reference = Feeder(cfg, queue, tok, tmp_path / "ref.jsonl")  # uninterrupted
    reference.top_up(0)
    fed_ids = list(reference.pending)
    for tid in fed_ids[:3]:
        reference.record("trained", tid, 1)
    reference.top_up(1)
    uninterrupted = list(reference.pending)  # 3 left over + 3 new

    first = Feeder(cfg, queue, tok, tmp_path / "a.jsonl")
    first.top_up(0)
    for tid in list(first.pending)[:3]:
        first.record("trained", tid, 1)
    state = json.loads(json.dumps(first.state()))  # through JSON, as checkpoint.py stores it
    assert [p["task_id"] for p in state["pending"]] == fed_ids[3:]
    assert state["ledger_offset"] == (tmp_path / "a.jsonl").stat().st_size
    first.top_up(1)  # the killed run went on feeding after the checkpoint; the resumed one must not skip those

    resumed = Feeder(cfg, queue, tok, tmp_path / "b.jsonl")
    resumed.restore(state)
    queue.read("g", 100, 100)
    assert resumed.top_up(version=7) == 6
    tasks = [t for _, t in queue.read("g", 100, 100)]
    assert [t.task_id for t in tasks] == uninterrupted
    assert [t.feed_version for t in tasks] == [7] * 6
    assert [t.prompt_ids for t in tasks[:3]] == [reference.pending[i].prompt_ids for i in uninterrupted[:3]]
    events = [json.loads(x)["event"] for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert events == ["refed"] * 3 + ["fed"] * 3
    for f in (reference, first, resumed):
        f.close()


def test_feeds_a_dataset_in_orz_format_through_the_template(redis_url: str, tmp_path: Path) -> None:
    data = tmp_path / "orz_math_57k_collected.json"
    long_question = "1+" * 400 + "1"

    def dialogue(question: str, answer: str) -> list[dict]:
        return [{"from": "human", "value": question}, {"from": "assistant", "ground_truth": {"value": answer}}]

    items: list = [dialogue(f"What is {i}+{i}?", str(2 * i)) for i in range(5)]
    items.insert(2, dialogue(long_question, "401"))
    items.insert(4, {"bad": "record"})
    data.write_text(json.dumps(items))
    cfg = Config.model_validate({
        "run_name": "feed-ds", "learner": {"batch_prompts": 2, "max_staleness": 1},
        "task": {"kind": "dataset", "train_files": [str(data)], "format": "orz", "template": "orz_base",
                 "max_prompt_tokens": 600}})  # the template is ~420 tokens with this tokenizer
    client = connect(redis_url)
    keys = Keys(cfg.namespace)
    queue = StreamQueue(client, keys.prompts, "generators", PromptTask, keys.dead)
    queue.ensure_group()
    feeder = Feeder(cfg, queue, _tokenizer(), tmp_path / "tasks.jsonl")
    assert len(feeder._stream) == 6  # the bad record skipped (and logged with its line)
    assert feeder.top_up(version=0) == 4
    tasks = [t for _, t in queue.read("g", 10, 100)]
    seen = {t.prompt.split("This is the problem:\n")[1].split("\nAssistant:")[0]: t for t in tasks}
    assert long_question not in seen  # over max_prompt_tokens: skipped, not fed
    assert all(t.prompt.startswith("A conversation between User and Assistant.") for t in tasks)
    assert all(t.prompt.endswith("Assistant: <think>") and t.prompt_ids for t in tasks)
    for question, t in seen.items():
        i = int(question.split()[2].split("+")[0])
        assert t.reference == str(2 * i) and t.task_type == "math"
    with pytest.raises(DataError, match="orz_math_57k_collected.json:1"):
        Feeder(cfg.model_copy(update={"task": cfg.task.model_copy(update={"on_bad_record": "reject"})}), queue,
               _tokenizer(), tmp_path / "tasks2.jsonl")
    too_small = cfg.model_copy(update={"task": cfg.task.model_copy(update={"max_prompt_tokens": 100})})
    with pytest.raises(ValueError, match="every training prompt is over task.max_prompt_tokens"):
        Feeder(too_small, queue, _tokenizer(), tmp_path / "tasks3.jsonl").top_up(version=0)


def test_texts_are_asked_for_in_samples_per_step_of_every_batch(redis_url: str, tmp_path: Path) -> None:
    """`logging.samples_per_step` of every `batch_prompts` prompts ask for their texts; a refed prompt keeps its
    ask; one top-up is one pipelined XADD round trip whatever its size."""
    cfg = Config.model_validate({"run_name": "texts", "learner": {"batch_prompts": 5, "max_staleness": 2},
                                 "logging": {"samples_per_step": 2}})
    client = connect(redis_url)
    keys = Keys(cfg.namespace)
    queue = StreamQueue(client, keys.prompts, "generators", PromptTask, keys.dead)
    queue.ensure_group()
    feeder = Feeder(cfg, queue, _tokenizer(), tmp_path / "tasks.jsonl")
    client.config_resetstat()
    assert feeder.top_up(version=0) == 15
    assert client.info("commandstats")["cmdstat_xadd"]["calls"] == 15
    tasks = [t for _, t in queue.read("g", 100, 100)]
    assert [t.with_texts for t in tasks] == [True, True, False, False, False] * 3
    feeder.refeed([tasks[1].task_id, tasks[2].task_id], version=1, reason="test")
    again = [t for _, t in queue.read("g", 100, 100)]
    assert [(t.task_id, t.with_texts) for t in again] == [(tasks[1].task_id, True), (tasks[2].task_id, False)]
    off = Config.model_validate({"run_name": "notexts", "learner": {"batch_prompts": 5},
                                 "logging": {"samples_per_step": 0}})
    quiet = Feeder(off, StreamQueue(client, Keys(off.namespace).prompts, "generators", PromptTask, keys.dead),
                   _tokenizer(), tmp_path / "quiet.jsonl")
    quiet.top_up(version=0)
    assert not any(t.with_texts for t in quiet.pending.values())
    feeder.close()
    quiet.close()

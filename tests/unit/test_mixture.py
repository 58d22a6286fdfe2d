"""The prompt stream (learner/mixture.py): a weighted mixture of Hugging Face sources, deterministic by seed, its
shares those of the weights, and a restore that lands exactly where the uninterrupted stream is."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import datasets
import pytest

from learner.mixture import PromptStream, eval_items, source_of
from services.config import Config
from services.tasks import all_problems, split, train_stream


def _write_sources(tmp: Path) -> tuple[Path, Path]:
    """Two sources: 30 rows as a parquet file, 10 as a save_to_disk DatasetDict (train and test splits)."""
    big = datasets.Dataset.from_list([{"question": f"{i}+1", "answer": str(i + 1)} for i in range(30)])
    big.to_parquet(tmp / "big.parquet")
    small = datasets.Dataset.from_list([{"problem": f"{i}-1", "solution": str(i - 1), "grader": "numeric"}
                                        for i in range(10)])
    datasets.DatasetDict({"train": small, "test": small.select(range(4))}).save_to_disk(str(tmp / "small"))
    return tmp / "big.parquet", tmp / "small"


def _cfg(big: Path, small: Path, seed: int = 7, weights: tuple[float, float] = (3.0, 1.0)) -> Config:
    return Config.model_validate({"task": {"kind": "dataset", "seed": seed, "template": "orz_base", "sources": [
        {"path": str(big), "weight": weights[0]},
        {"path": str(small), "name": "small", "weight": weights[1], "question_field": "problem",
         "answer_field": "solution", "task_type_field": "grader", "eval_path": str(small)},
    ]}})


def test_mixture_items_carry_their_source_field_mapping_and_grader(tmp_path: Path) -> None:
    big, small = _write_sources(tmp_path)
    stream = PromptStream(_cfg(big, small))
    assert stream.labels == ["big", "small"] and len(stream) == 40
    items = list(itertools.islice(stream, 200))
    by = {label: [i for i in items if i.task_id.split(":")[0] == label] for label in stream.labels}
    assert all(i.task_type == "math" and i.reference == str(int(i.task_id.split(":")[1]) + 1) for i in by["big"])
    assert all(i.task_type == "numeric" and i.reference == str(int(i.task_id.split(":")[1]) - 1) for i in by["small"])
    assert all(i.prompt.startswith("A conversation between User and Assistant.") for i in items)
    # each source is epoch-shuffled on its own: its first len(source) draws hold every row once
    assert len({i.task_id for i in by["small"][:10]}) == 10
    assert source_of("00000012:small:3") == "small" and source_of("arith:7+5") == "arith"


def test_shares_follow_the_weights(tmp_path: Path) -> None:
    big, small = _write_sources(tmp_path)
    n = 20_000
    for weights in ((3.0, 1.0), (1.0, 4.0)):
        stream = PromptStream(_cfg(big, small, weights=weights))
        drawn = [i.task_id.split(":")[0] for i in itertools.islice(stream, n)]
        p = weights[0] / sum(weights)
        share, sd = drawn.count("big") / n, math.sqrt(p * (1 - p) / n)
        assert abs(share - p) < 4 * sd, (weights, share)
        assert stream.state()["cursors"] == {"big": drawn.count("big"), "small": drawn.count("small")}


def test_same_seed_same_stream_other_seed_other_stream(tmp_path: Path) -> None:
    big, small = _write_sources(tmp_path)
    first = [i.task_id for i in itertools.islice(PromptStream(_cfg(big, small)), 100)]
    assert first == [i.task_id for i in itertools.islice(PromptStream(_cfg(big, small)), 100)]
    assert first != [i.task_id for i in itertools.islice(PromptStream(_cfg(big, small, seed=8)), 100)]


@pytest.mark.parametrize("cut", [0, 1, 37, 123])
def test_restore_continues_exactly_where_the_uninterrupted_stream_is(tmp_path: Path, cut: int) -> None:
    big, small = _write_sources(tmp_path)
    whole = [i.task_id for i in itertools.islice(PromptStream(_cfg(big, small)), cut + 80)]
    first = PromptStream(_cfg(big, small))
    head = [i.task_id for i in itertools.islice(first, cut)]
    resumed = PromptStream(_cfg(big, small))
    resumed.restore(first.state())
    assert head + [i.task_id for i in itertools.islice(resumed, 80)] == whole


def test_restore_refuses_cursors_the_configured_sources_do_not_give(tmp_path: Path) -> None:
    big, small = _write_sources(tmp_path)
    stream = PromptStream(_cfg(big, small))
    list(itertools.islice(stream, 50))
    state = stream.state()
    other = PromptStream(_cfg(big, small, weights=(1.0, 1.0)))
    with pytest.raises(ValueError, match="resume with the run's own sources"):
        other.restore(state)


def test_a_single_source_keeps_the_order_runs_have_always_had() -> None:
    """The toy task through PromptStream feeds what `train_stream(train problems, task.seed)` always fed."""
    cfg = Config()
    train, _ = split(all_problems(cfg.task.min_terms, cfg.task.max_terms, cfg.task.max_operand))
    expected = [p.task_id for p in itertools.islice(train_stream(train, cfg.task.seed), 3000)]
    assert [i.task_id for i in itertools.islice(PromptStream(cfg), 3000)] == expected
    old_style = PromptStream(cfg)  # a checkpoint from before mixtures: its cursor is the count fed
    old_style.restore({"draws": 1000, "cursors": {"arith": 1000}})
    assert [i.task_id for i in itertools.islice(old_style, 2000)] == expected[1000:]


def test_sources_config_errors() -> None:
    with pytest.raises(ValueError, match="use one"):
        Config.model_validate({"task": {"kind": "dataset", "train_files": ["a.json"], "sources": [{"path": "b"}]}})
    with pytest.raises(ValueError, match="needs task.kind: dataset"):
        Config.model_validate({"task": {"sources": [{"path": "b"}]}})
    with pytest.raises(ValueError, match="named alike"):
        Config.model_validate({"task": {"kind": "dataset", "sources": [{"path": "x/a.parquet"},
                                                                         {"path": "y/a.parquet"}]}})
    with pytest.raises(ValueError, match="greater than 0"):
        Config.model_validate({"task": {"kind": "dataset", "sources": [{"path": "a", "weight": 0}]}})


def test_eval_rows_come_from_each_sources_eval_path(tmp_path: Path) -> None:
    big, small = _write_sources(tmp_path)
    rows = eval_items(_cfg(big, small), 3)
    assert [r.task_id for r in rows] == ["small:0", "small:1", "small:2"]  # the test split's first 3
    assert all(r.task_type == "numeric" for r in rows)

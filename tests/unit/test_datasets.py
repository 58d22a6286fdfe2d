"""Data loaders: ORZ's formats and JSONL, bad records reported with file and line, templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.datasets import BENCHES, DataError, bench_records, load, render, template


def _orz_item(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "assistant", "ground_truth": {"value": a}}]


def test_orz_training_format_with_a_bad_record_reported_by_line(tmp_path: Path, caplog) -> None:
    items = [_orz_item("What is 1+1?", "2"), {"not": "a dialogue"}, _orz_item("Solve x+1=3.", "x=2"),
             [{"from": "human", "value": "no answer"}, {"from": "assistant"}]]
    path = tmp_path / "orz_math_57k_collected.json"
    path.write_text(json.dumps(items, indent=2))  # pretty-printed: records start on known lines
    records = load(path, "orz")
    assert [(r.question, r.answer) for r in records] == [("What is 1+1?", "2"), ("Solve x+1=3.", "x=2")]
    assert [r.task_id for r in records] == ["orz_math_57k_collected:0", "orz_math_57k_collected:2"]
    text = path.read_text().splitlines()
    bad_lines = [i + 1 for i, line in enumerate(text) if line == "  {" and '"not"' in text[i + 1]]
    assert any(f"{path}:{bad_lines[0]}:" in m for m in caplog.messages), caplog.messages
    with pytest.raises(DataError) as err:
        load(path, "orz", on_bad="reject")
    assert "2 bad record(s)" in str(err.value) and f"{path}:{bad_lines[0]}" in str(err.value)


def test_jsonl_with_configurable_fields_and_gsm8k_answers(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"problem": "Q1", "solution": "work\\n#### 1,000"}\n\n{"problem": "Q2", "solution": 7.0}\n'
                    'not json\n{"problem": "", "solution": "3"}\n')
    records = load(path, "jsonl", question_field="problem", answer_field="solution")
    assert [(r.question, r.answer, r.source) for r in records] == [("Q1", "1,000", f"{path}:1"),
                                                                   ("Q2", "7", f"{path}:3")]
    with pytest.raises(DataError, match=rf"{path}:4: invalid JSON") as err:
        load(path, "jsonl", question_field="problem", answer_field="solution", on_bad="reject")
    assert f"{path}:5: record" in str(err.value)


def test_unreadable_and_empty_files_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('[{"prompt": [{"value": "q"}], "final_answer": "1"}, {oops')
    with pytest.raises(DataError, match="broken.json:1: invalid JSON"):
        load(tmp_path / "broken.json", "orz_eval")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load(tmp_path / "obj.json", "orz")
    with pytest.raises(DataError, match="cannot read"):
        load(tmp_path / "missing.json", "orz")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no usable records"):
        load(tmp_path / "empty.jsonl", "jsonl")


def test_shipped_benchmarks_load() -> None:
    sizes = {name: len(bench_records(name)[1]) for name in BENCHES}
    assert sizes == {"math500": 500, "aime2024": 30, "gpqa_diamond": 198, "gsm8k": 1319, "amc23": 40}
    _, gsm = bench_records("gsm8k", limit=1)
    assert gsm[0].answer == "18"  # the number after ####
    with pytest.raises(DataError, match="unknown benchmark"):
        bench_records("mmlu")


def test_templates(tmp_path: Path) -> None:
    orz = render(template("orz_base"), "What is $1+1$?")
    assert orz.startswith("A conversation between User and Assistant.")
    assert orz.endswith("This is the problem:\nWhat is $1+1$?\nAssistant: <think>")
    assert "\\boxed{}" in orz  # braces in the template text are kept as they are
    chat = render(template("chat"), "Q?")
    assert "<|im_start|>user\nQ?<|im_end|>" in chat and chat.endswith("<think>")
    bad = tmp_path / "t.txt"
    bad.write_text("no placeholder")
    with pytest.raises(DataError, match="exactly one"):
        template(str(bad))

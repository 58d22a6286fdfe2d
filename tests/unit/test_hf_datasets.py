"""`format: hf`: Hugging Face datasets on local disk, read with the `datasets` library (services/datasets.py):
every file kind `load_dataset` takes, `load_from_disk` directories and their splits, field mapping, a per-row
grader, and bad rows reported by file, split and row."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from services.datasets import DataError, load

ROWS = [{"q": "What is 1+1?", "a": "2", "kind": "math"}, {"q": "Pick one", "a": "B", "kind": "choice"},
        {"q": "GSM", "a": "so\n#### 1,000", "kind": "numeric"}]


def _write(tmp: Path, kind: str, rows: list[dict]) -> Path:
    ds = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        ds.to_parquet(tmp / "d.parquet")
        return tmp / "d.parquet"
    if kind == "jsonl":
        (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp / "d.jsonl"
    if kind == "json":
        (tmp / "d.json").write_text(json.dumps(rows))
        return tmp / "d.json"
    if kind == "csv":
        ds.to_csv(tmp / "d.csv", index=False)
        return tmp / "d.csv"
    if kind == "arrow":
        ds.save_to_disk(str(tmp / "saved"))
        return next((tmp / "saved").glob("*.arrow"))
    ds.save_to_disk(str(tmp / "disk"))
    return tmp / "disk"


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "json", "csv", "arrow", "disk"])
def test_every_local_kind_loads_with_field_mapping(tmp_path: Path, kind: str) -> None:
    path = _write(tmp_path, kind, ROWS)
    records = load(path, "hf", question_field="q", answer_field="a", task_type_field="kind")
    assert [(r.question, r.answer, r.task_type) for r in records] == [
        ("What is 1+1?", "2", "math"), ("Pick one", "B", "choice"), ("GSM", "1,000", "numeric")]
    assert [r.task_id for r in records] == [f"{path.stem}:{i}" for i in range(3)]
    assert records[1].source == f"{path}[train] row 2"


def test_a_dataset_dict_directory_by_split(tmp_path: Path) -> None:
    d = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                              "test": datasets.Dataset.from_list(ROWS[:1])})
    d.save_to_disk(str(tmp_path / "dd"))
    assert len(load(tmp_path / "dd", "hf", question_field="q", answer_field="a")) == 3
    assert len(load(tmp_path / "dd", "hf", question_field="q", answer_field="a", split="test")) == 1
    with pytest.raises(DataError, match=r"no split 'validation' \(it has train, test\)"):
        load(tmp_path / "dd", "hf", question_field="q", answer_field="a", split="validation")


def test_bad_rows_are_reported_by_file_split_and_row(tmp_path: Path, caplog) -> None:
    rows = [*ROWS, {"q": "", "a": "1", "kind": "math"}, {"q": "x", "a": None, "kind": "math"},
            {"q": "y", "a": "1", "kind": "not a grader"}]
    path = _write(tmp_path, "parquet", rows)
    records = load(path, "hf", question_field="q", answer_field="a", task_type_field="kind")
    assert len(records) == 3
    for row in (4, 5, 6):
        assert any(f"{path}[train] row {row}:" in m for m in caplog.messages), caplog.messages
    assert any("no grader name in 'kind'" in m for m in caplog.messages)
    with pytest.raises(DataError) as err:
        load(path, "hf", question_field="q", answer_field="a", task_type_field="kind", on_bad="reject")
    assert "3 bad record(s)" in str(err.value) and f"{path}[train] row 4" in str(err.value)
    with pytest.raises(DataError, match="is not {question, answer}"):  # default field names absent
        load(path, "hf", on_bad="reject")


def test_what_cannot_be_loaded_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match=r"broken.parquet: cannot load as a Hugging Face dataset \("):
        load(tmp_path / "broken.parquet", "hf")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="format hf reads"):
        load(tmp_path / "notes.txt", "hf")
    with pytest.raises(DataError, match="cannot load"):
        load(tmp_path / "missing.parquet", "hf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="cannot load"):
        load(empty, "hf")

"""Prompt data: loaders for ORZ's training and evaluation files and for JSONL, prompt templates, and the
evaluation benchmarks shipped in data/.

Formats:
- `orz`: ORZ's training collections (orz_math_57k/72k/13k, downloaded by the user): a JSON list of
  `[{"from": "human", "value": Q}, {"from": "assistant", "ground_truth": {"value": A}}]`.
- `orz_eval`: ORZ's evaluation files: a JSON list of `{"prompt": [{"from": "user", "value": Q}],
  "final_answer": A}` (GPQA adds `"choices"`).
- `jsonl`: one JSON object per line; the question and answer fields are named by the caller
  (`question_field`, `answer_field`); an answer holding `#### N` (GSM8K) keeps N.
- `hf`: a Hugging Face dataset on local disk, read with the `datasets` library: a parquet, JSON/JSONL, CSV or
  Arrow file (`load_dataset` with the matching builder, `split` of it) or a directory written by
  `save_to_disk` (`load_from_disk`; a DatasetDict's `split`). Fields as for jsonl.

For jsonl and hf, `task_type_field` names an optional per-row grader (the reward server's `task_type`).

A bad record (not an object, a missing or empty field, a non-string question) is reported with its file
and line. `on_bad: skip` logs it and goes on; `reject` raises `DataError` listing every bad record (up to
20). A file that is not JSON at all is always a `DataError`, never a stack trace from the parser.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("orz.data")

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "templates"
DATA = ROOT / "data"
Format = Literal["orz", "orz_eval", "jsonl", "hf"]
_HF_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


class DataError(ValueError):
    """A data file that cannot be used, with the file and line of each problem."""


@dataclass(frozen=True)
class Record:
    task_id: str  # "<file stem>:<index>", stable across runs
    question: str
    answer: str
    source: str  # file:line, for messages
    task_type: str | None = None  # the row's own grader (hf: task_type_field), else the source's


def _json_array_items(path: Path, text: str):
    """(line, item) for each element of a top-level JSON array, with the line each element starts on."""
    decoder = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text[i:i + 1] == "[":
        raise DataError(f"{path}:1: expected a JSON list of records")
    i += 1
    line = text.count("\n", 0, i) + 1
    pos = i
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise DataError(f"{path}:{text.count(chr(10)) + 1}: unterminated JSON list")
        if text[pos] == "]":
            return
        line += text.count("\n", i, pos)
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        yield line, item
        i, pos = pos, end


def _field(obj: object, *keys: str | int) -> object:
    for key in keys:
        if isinstance(key, int):
            if not isinstance(obj, list) or len(obj) <= key:
                return None
            obj = obj[key]
        else:
            if not isinstance(obj, dict) or key not in obj:
                return None
            obj = obj[key]
    return obj


def _answer_text(value: object) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() else str(value)
    if isinstance(value, str):
        text = value.split("####")[-1].strip() if "####" in value else value.strip()
        return text or None
    return None


def _hf_rows(path: Path, split: str) -> list:
    """(row number, row) of a Hugging Face dataset on local disk; nothing is fetched from the Hub."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: format hf needs the datasets library: pip install 'orz-async[data]'") from None
    datasets.disable_progress_bars()  # one log line per event, never a progress bar in a log file
    datasets.logging.set_verbosity_error()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{path}: no split {split!r} (it has {', '.join(ds)})")
                ds = ds[split]
        elif path.suffix in _HF_BUILDERS:
            ds = datasets.load_dataset(_HF_BUILDERS[path.suffix], data_files={split: str(path)}, split=split)
        else:
            raise DataError(f"{path}: format hf reads {', '.join(_HF_BUILDERS)} files or save_to_disk directories")
    except DataError:
        raise
    except Exception as exc:  # the library's own errors (a corrupt parquet, a missing file) with the path
        raise DataError(f"{path}: cannot load as a Hugging Face dataset ({type(exc).__name__}: {exc})") from None
    return list(enumerate(ds, start=1))


def load(path: str | Path, fmt: Format, *, question_field: str = "question", answer_field: str = "answer",
         on_bad: Literal["skip", "reject"] = "skip", limit: int | None = None, split: str = "train",
         task_type_field: str | None = None) -> list[Record]:
    path = Path(path)
    if fmt == "hf":
        return _records(path, _hf_rows(path, split), fmt, question_field, answer_field, task_type_field, on_bad,
                        limit, where_prefix=f"{path}[{split}] row")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if fmt == "jsonl":
        items = []
        for n, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                items.append((n, json.loads(raw)))
            except json.JSONDecodeError as exc:
                items.append((n, DataError(f"invalid JSON ({exc.msg})")))
    elif fmt in ("orz", "orz_eval"):
        items = list(_json_array_items(path, text))
    else:
        raise DataError(f"{path}: unknown format {fmt!r} (orz, orz_eval, jsonl, hf)")
    return _records(path, items, fmt, question_field, answer_field, task_type_field if fmt == "jsonl" else None,
                    on_bad, limit, where_prefix=f"{path}:")


def _records(path: Path, items: list, fmt: Format, question_field: str, answer_field: str,
             task_type_field: str | None, on_bad: Literal["skip", "reject"], limit: int | None,
             where_prefix: str) -> list[Record]:
    records: list[Record] = []
    bad: list[str] = []
    for index, (line, item) in enumerate(items):
        where = f"{where_prefix}{line}" if where_prefix.endswith(":") else f"{where_prefix} {line}"
        if isinstance(item, DataError):
            bad.append(f"{where}: {item}")
            continue
        if fmt == "orz":
            question, answer = _field(item, 0, "value"), _field(item, 1, "ground_truth", "value")
            what = "[{from: human, value}, {from: assistant, ground_truth: {value}}]"
        elif fmt == "orz_eval":
            question, answer = _field(item, "prompt", 0, "value"), _field(item, "final_answer")
            what = "{prompt: [{value}], final_answer}"
        else:
            question, answer = _field(item, question_field), _field(item, answer_field)
            what = f"{{{question_field}, {answer_field}}}"
        answer_text = _answer_text(answer)
        if not isinstance(question, str) or not question.strip() or answer_text is None:
            bad.append(f"{where}: record {index} is not {what} with a non-empty question and answer")
            continue
        task_type = None
        if task_type_field is not None:
            task_type = _field(item, task_type_field)
            if not isinstance(task_type, str) or not task_type.isidentifier():
                bad.append(f"{where}: record {index} has no grader name in {task_type_field!r}")
                continue
        records.append(Record(f"{path.stem}:{index}", question.strip(), answer_text, where, task_type))
        if limit is not None and len(records) >= limit:
            break
    if bad:
        if on_bad == "reject":
            more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
            raise DataError(f"{len(bad)} bad record(s) in {path}{more}:\n" + "\n".join(bad[:20]))
        for message in bad[:20]:
            log.warning("skipped %s", message)
        if len(bad) > 20:
            log.warning("skipped %d more bad records in %s", len(bad) - 20, path)
    if not records:
        raise DataError(f"{path}: no usable records")
    return records


def template(name_or_path: str) -> str:
    """A prompt template's text: a path, or a name in templates/ (`orz_base`, `chat`)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TEMPLATES / f"{name_or_path}.txt"
    text = path.read_text(encoding="utf-8")
    if text.count("{question}") != 1:
        raise DataError(f"{path}: a template needs exactly one {{question}} placeholder")
    return text


def render(template_text: str, question: str) -> str:
    return template_text.replace("{question}", question)


@dataclass(frozen=True)
class Bench:
    name: str
    path: Path
    fmt: Format
    task_type: str  # the reward server's grader
    question_field: str = "question"
    answer_field: str = "answer"


BENCHES = {b.name: b for b in (
    Bench("math500", DATA / "orz_eval" / "math500.json", "orz_eval", "math"),
    Bench("aime2024", DATA / "orz_eval" / "aime2024.json", "orz_eval", "math"),
    Bench("gpqa_diamond", DATA / "orz_eval" / "gpqa_diamond.json", "orz_eval", "choice"),
    Bench("gsm8k", DATA / "qwen25_math_eval" / "gsm8k.jsonl", "jsonl", "numeric"),
    Bench("amc23", DATA / "qwen25_math_eval" / "amc23.jsonl", "jsonl", "math"),
)}


def bench_records(name: str, limit: int | None = None) -> tuple[Bench, list[Record]]:
    if name not in BENCHES:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHES)}")
    b = BENCHES[name]
    return b, load(b.path, b.fmt, question_field=b.question_field, answer_field=b.answer_field, on_bad="reject",
                   limit=limit)

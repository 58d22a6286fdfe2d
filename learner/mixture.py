"""The training prompts of a run as one seeded, endless stream: the toy task's problems, the `train_files`
concatenated, or a weighted mixture of `task.sources`.

A mixture draws each prompt's source with its own seeded RNG in proportion to the weights, then takes that
source's next item from the source's epoch-shuffled stream. Its state, the draws made and each source's cursor,
goes into the checkpoint; restoring replays the draws and checks that they land on the saved cursors, so a
resumed run feeds exactly the prompts the uninterrupted run would have.

Task ids name their source: `<label>:<row>` (`arith:7+5` for the toy task, `<file stem>:<row>` for
train_files), so the per-source figures need no lookup table and survive a resume.
"""

from __future__ import annotations

import itertools
import logging
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from services.config import Config, SourceConfig
from services.datasets import load, render, template
from services.tasks import all_problems, split, train_stream

log = logging.getLogger("orz.feeder")


@dataclass(frozen=True)
class Item:
    task_id: str  # "<source label>:<row>"
    prompt: str
    reference: str
    task_type: str


def source_of(task_id: str) -> str:
    """The source label of a fed task id (`00000012:gsm8k:41` → `gsm8k`)."""
    parts = task_id.split(":")
    return parts[1] if len(parts) > 2 else parts[0]


def _source_items(cfg: Config, s: SourceConfig, path: str, split_name: str) -> list[Item]:
    tc = cfg.task
    records = load(Path(path).expanduser(), s.format, question_field=s.question_field or tc.question_field,
                   answer_field=s.answer_field or tc.answer_field, on_bad=tc.on_bad_record, split=split_name,
                   task_type_field=s.task_type_field or tc.task_type_field)
    text = template(s.template or tc.template)
    default_type = s.task_type or tc.task_type
    return [Item(f"{s.label}:{r.task_id.rsplit(':', 1)[1]}", render(text, r.question), r.answer,
                 r.task_type or default_type) for r in records]


def eval_items(cfg: Config, limit: int) -> list[Item]:
    """The in-training evaluation rows of the sources that name an `eval_path` (the first `limit` of each)."""
    out: list[Item] = []
    for s in cfg.task.sources:
        if s.eval_path:
            out += _source_items(cfg, s, s.eval_path, s.eval_split)[:limit]
    return out


class PromptStream:
    def __init__(self, cfg: Config) -> None:
        tc = cfg.task
        self.seed = tc.seed
        if tc.kind == "toy_arith":
            train, _ = split(all_problems(tc.min_terms, tc.max_terms, tc.max_operand))
            self.sources = {"arith": [Item(p.task_id, p.prompt, str(p.answer), tc.task_type) for p in train]}
            self.weights = [1.0]
        elif tc.sources:
            self.sources = {s.label: _source_items(cfg, s, s.path, s.split) for s in tc.sources}
            self.weights = [s.weight for s in tc.sources]
            for s in tc.sources:
                log.info("training data: source %s, %d problems from %s (weight %g)", s.label,
                         len(self.sources[s.label]), s.path, s.weight)
        elif tc.train_files:
            items: list[Item] = []
            for path in tc.train_files:
                one = SourceConfig(path=path, format=tc.format, split=tc.split)
                got = _source_items(cfg, one, path, tc.split)
                items += got
                log.info("training data: %d problems from %s", len(got), path)
            self.sources = {"train_files": items}
            self.weights = [1.0]
        else:
            raise ValueError("task.kind is dataset but neither task.train_files nor task.sources is set")
        self.labels = list(self.sources)
        self.restore({"draws": 0, "cursors": dict.fromkeys(self.labels, 0)})

    @property
    def source_labels(self) -> list[str]:
        """The labels task ids carry (`source_of`): the sources', or each train file's stem."""
        return sorted({source_of(item.task_id) for items in self.sources.values() for item in items})

    def __len__(self) -> int:
        return sum(len(items) for items in self.sources.values())

    def _stream(self, label: str) -> Iterator[Item]:
        # one source: the run's seed itself, so a single-source run feeds the order it always has
        seed = self.seed if len(self.labels) == 1 else self.seed ^ zlib.crc32(label.encode())
        return train_stream(self.sources[label], seed)

    def _choose(self) -> str:
        return self.labels[0] if len(self.labels) == 1 else self._rng.choices(self.labels, self.weights)[0]

    def __iter__(self) -> PromptStream:
        return self

    def __next__(self) -> Item:
        label = self._choose()
        self.draws += 1
        self.cursors[label] += 1
        return next(self._streams[label])

    def state(self) -> dict:
        return {"draws": self.draws, "cursors": dict(self.cursors)}

    def restore(self, state: dict) -> None:
        """Back to `state`: the draws replayed, each source's stream moved on to its cursor."""
        self._rng = random.Random(self.seed)
        counts = dict.fromkeys(self.labels, 0)
        for _ in range(int(state["draws"])):
            counts[self._choose()] += 1
        saved = {k: int(v) for k, v in state["cursors"].items()}
        if saved != counts:
            raise ValueError(f"the checkpoint's source cursors {saved} are not those its {state['draws']} draws "
                             f"give with task.sources as configured ({counts}): resume with the run's own sources")
        self.draws, self.cursors = int(state["draws"]), counts
        self._streams = {label: itertools.islice(self._stream(label), counts[label], None) for label in self.labels}

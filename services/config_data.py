"""The `task` section of the config: where the training prompts come from (the toy task, `train_files`, or a
weighted mixture of `sources`) and how they are read (services/datasets.py, learner/mixture.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from services.config_base import _Section

DataFormat = Literal["orz", "orz_eval", "jsonl", "hf"]


class SourceConfig(_Section):
    """One source of a weighted mixture (`task.sources`); unset fields take the `task.` setting of that name."""

    path: str = Field(description="a file (hf: parquet, json, jsonl, csv, arrow) or a save_to_disk directory")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="names the source in task ids, "
                             "metrics and Grafana (null: the file's stem)")
    weight: float = Field(1.0, gt=0, description="share of the fed prompts, relative to the other sources' weights")
    split: str = Field("train", description="hf: the split to train on")
    format: DataFormat = Field("hf", description="hf (the datasets library) or one of task.format's others")
    task_type: str | None = Field(None, description="grader of this source's rows (null: task.task_type)")
    template: str | None = Field(None, description="prompt template (null: task.template)")
    question_field: str | None = Field(None, description="null: task.question_field")
    answer_field: str | None = Field(None, description="null: task.answer_field")
    task_type_field: str | None = Field(None, description="a per-row grader field (null: task.task_type_field)")
    eval_path: str | None = Field(None, description="in-training evaluation rows of this source (its first "
                                  "learner.eval_size), reported per source; null: none")
    eval_split: str = Field("test", description="hf: the split of eval_path")

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


class TaskConfig(_Section):
    kind: Literal["toy_arith", "dataset"] = Field(
        "toy_arith", description="prompt source: the synthetic arithmetic task, or `train_files` / `sources`")
    train_files: list[str] = Field(default_factory=list, description="dataset: training files (ORZ's "
                                   "orz_math_57k_collected.json etc., JSONL, or Hugging Face data), concatenated")
    sources: list[SourceConfig] = Field(default_factory=list, description="dataset: a weighted mixture instead of "
                                        "train_files, drawn deterministically by task.seed; fields below")
    format: DataFormat = Field("orz", description="dataset: the files' format (hf: Hugging Face datasets on disk)")
    split: str = Field("train", description="dataset, hf: the split of train_files")
    question_field: str = Field("question", description="dataset, jsonl / hf: the question's field")
    answer_field: str = Field("answer", description="dataset, jsonl / hf: the reference answer's field")
    task_type_field: str | None = Field(None, description="dataset, jsonl / hf: a field naming each row's grader "
                                        "(null: task_type for every row)")
    template: str = Field("orz_base", description="dataset: prompt template (templates/ name or a path)")
    on_bad_record: Literal["skip", "reject"] = Field(
        "skip", description="dataset: a malformed record is logged with file:line and skipped, or stops the run")
    max_prompt_tokens: int = Field(2048, description="dataset: longer prompts are skipped (ORZ: 2k)", ge=1)
    seed: int = Field(1234, description="seed of the prompt order and the evaluation sample")
    min_terms: int = Field(2, description="fewest numbers in a problem", ge=1)
    max_terms: int = Field(3, description="most numbers in a problem", ge=1)
    max_operand: int = Field(9, description="largest number in a problem", ge=1)
    eval_size: int = Field(200, description="held-out problems for the accuracy report", ge=1)
    task_type: str = Field("math", description="grader the reward server uses")

    @model_validator(mode="after")
    def _one_kind_of_data(self) -> TaskConfig:
        if self.sources and self.train_files:
            raise ValueError("task.sources and task.train_files are two ways to give the data: use one")
        if self.sources and self.kind != "dataset":
            raise ValueError("task.sources needs task.kind: dataset")
        labels = [s.label for s in self.sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"task.sources: two sources are named alike ({labels}); give them distinct `name`s")
        return self



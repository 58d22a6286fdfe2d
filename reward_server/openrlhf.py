"""`POST /v1/openrlhf`: this grader behind OpenRLHF's `--remote_rm_url`, with nothing changed on OpenRLHF's side.

OpenRLHF posts `{"query": [...], "prompts": [...], "labels": [...]}`: each query is the decoded prompt followed by
the completion, each label the dataset's `--label_key` column (here: the reference answer). It reads
`{"rewards": [...]}` (and, in its newer versions, `scores` and `extra_logs`). The completion graded is the query
after its prompt: the text following the first occurrence of the prompt, so left padding decoded in front of it
does no harm. A query that does not contain its prompt is a malformed request (422, naming the rows), never a
zero reward.

The limits, the bearer token and the metrics are those of `/v1/grade`. A fault of the grader on any row (verdict
`error`) answers 503 naming the rows, so that OpenRLHF's client retries the batch instead of training on a 0 that
judged nothing.
"""

# no `from __future__ import annotations`: FastAPI resolves the route's annotations, which name local types
import asyncio
import time
from typing import Annotated, Literal

from fastapi import FastAPI, HTTPException, Query
from pydantic import BaseModel, Field, model_validator

from reward_server.graders import REGISTRY
from reward_server.grading import Grader, RewardMetrics
from services.config import RewardConfig

ROUTE = "/v1/openrlhf"


class OpenRLHFResponse(BaseModel):
    rewards: list[float] = Field(description="1.0 for a correct answer, else 0.0, one per query, in order")
    scores: list[float] = Field(description="the same values (OpenRLHF's dynamic filtering reads `scores`)")
    verdicts: list[str] = Field(description="this grader's verdict per query (ignored by OpenRLHF)")
    extra_logs: dict[str, list[float]] = Field(
        description="per-query values OpenRLHF logs as means: `answer_found` (a boxed answer was extracted)")


def openrlhf_request_model(cfg: RewardConfig) -> type[BaseModel]:
    """The request body OpenRLHF's remote reward client sends, with `/v1/grade`'s limits. Fields OpenRLHF's
    newer versions add (`datasources`, token ids) are accepted and ignored."""
    text = Annotated[str, Field(max_length=cfg.max_response_chars)]
    label = Annotated[str, Field(max_length=cfg.max_reference_chars)]

    class OpenRLHFRequest(BaseModel):
        query: list[text] = Field(max_length=cfg.max_items, description="prompt + completion, decoded")
        prompts: list[text] = Field(max_length=cfg.max_items, description="the prompt of each query")
        labels: list[label] = Field(max_length=cfg.max_items, description="the reference answer of each query")

        @model_validator(mode="after")
        def _same_length(self) -> "OpenRLHFRequest":
            if not len(self.query) == len(self.prompts) == len(self.labels):
                raise ValueError(f"query, prompts and labels must have the same length (got {len(self.query)}, "
                                 f"{len(self.prompts)}, {len(self.labels)})")
            return self

    return OpenRLHFRequest


def completions(queries: list[str], prompts: list[str]) -> list[str]:
    """Each query's text after its prompt; raises ValueError naming the rows whose query lacks its prompt."""
    starts = [q.find(p) for q, p in zip(queries, prompts)]
    missing = [i for i, s in enumerate(starts) if s < 0]
    if missing:
        raise ValueError(f"rows {missing[:16]}{' …' if len(missing) > 16 else ''} of {len(queries)}: the query "
                         "does not contain its prompt, so the completion cannot be told apart")
    return [q[s + len(p):] for q, p, s in zip(queries, prompts, starts)]


def add_openrlhf_route(app: FastAPI, cfg: RewardConfig, grader: Grader, metrics: RewardMetrics,
                       auth: list, responses: dict) -> None:
    body_model = openrlhf_request_model(cfg)
    task_types = Literal[tuple(REGISTRY)]  # type: ignore[valid-type]

    @app.post(ROUTE, response_model=OpenRLHFResponse, dependencies=auth,
              responses={**responses, 503: {"description": "the grader failed on some rows: retry the batch"}})
    async def openrlhf(body: body_model,  # type: ignore[valid-type]
                       task_type: task_types = Query("math", description="grader for every row: "  # type: ignore
                                                     + ", ".join(REGISTRY))) -> dict:
        t0 = time.perf_counter()
        try:
            texts = completions(body.query, body.prompts)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        results = await asyncio.gather(*(grader.grade_one(str(i), text, ref, False, task_type)
                                         for i, (text, ref) in enumerate(zip(texts, body.labels))))
        metrics.request_latency.observe(time.perf_counter() - t0)
        metrics.request_items.observe(len(results))
        failed = [i for i, r in enumerate(results) if r.verdict == "error"]
        if failed:
            raise HTTPException(503, f"grader fault on rows {failed[:16]} of {len(results)}: "
                                     f"{results[failed[0]].detail}; retry the batch",
                                headers={"Retry-After": "1"})
        rewards = [r.reward for r in results]
        return {"rewards": rewards, "scores": rewards, "verdicts": [r.verdict for r in results],
                "extra_logs": {"answer_found": [float(r.extracted is not None) for r in results]}}

"""The reward server process: FastAPI app (`POST /v1/grade`, `POST /v1/openrlhf`, `GET /healthz`, `GET /metrics`)
run by uvicorn.

The only contract with the generators is the HTTP API below (docs/architecture.md, "Messages"). Limits on a
request come from `RewardConfig` and are declared on the pydantic models, so the OpenAPI page at `/docs`
documents them. Grading itself lives in `reward_server/grading.py`; nothing here touches sympy, so
`/healthz` answers while every grading worker is stuck on a hostile item.
"""

import asyncio
import logging
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Literal

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from pydantic import BaseModel, Field

from reward_server.graders import REGISTRY, VERDICTS, Verdict
from reward_server.grading import Grader, RewardMetrics
from reward_server.openrlhf import add_openrlhf_route
from services.config import Config, RewardConfig
from services.config_io import config_to_env, load_config

log = logging.getLogger("orz.reward")

MAX_ID_CHARS = 256
_BYTES_PER_CHAR = 6  # worst case of a character in JSON (`\u0001`), so a valid body is never refused
_OVERSIZE_ERRORS = {"string_too_long", "too_long"}


class GradeResultModel(BaseModel):
    id: str
    reward: float = Field(description="1.0 for a correct answer, else 0.0")
    extracted: str | None = Field(description="the boxed answer that was graded, if one was found")
    verdict: Verdict = Field(description=" | ".join(VERDICTS) + "; `error` is a fault of the grader, never a "
                             "judgement of the answer: grade the item again later, do not score it 0")
    detail: str | None = Field(None, description="for `error`: what went wrong in the grader")


class ErrorResponse(BaseModel):
    detail: str | list[dict] = Field(description="what was wrong with the request")


ERROR_RESPONSES: dict = {
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token (when `reward.token` is set)"},
    413: {"model": ErrorResponse, "description": "request body, item count or a field over its limit"},
    422: {"model": ErrorResponse, "description": "malformed request"},
}


class GradeResponse(BaseModel):
    results: list[GradeResultModel] = Field(description="one result per item, in request order")


def request_model(cfg: RewardConfig) -> type[BaseModel]:
    """The `/v1/grade` request body, its limits taken from `cfg`."""

    class GradeItem(BaseModel):
        id: str = Field(max_length=MAX_ID_CHARS, description="echoed back in the result")
        response: str = Field(max_length=cfg.max_response_chars, description="the model's completion")
        reference: str = Field(max_length=cfg.max_reference_chars, description="the gold answer (LaTeX)")
        task_type: Literal[tuple(REGISTRY)] = Field(  # type: ignore[valid-type]
            "math", description="grader: " + ", ".join(REGISTRY) + " (reward_server/graders/)")
        truncated: bool = Field(False, description="the completion hit the token cap: reward 0, verdict truncated")

    class GradeRequest(BaseModel):
        items: list[GradeItem] = Field(max_length=cfg.max_items)

    return GradeRequest


def max_body_bytes(cfg: RewardConfig) -> int:
    # the larger of a /v1/grade item and a /v1/openrlhf row (query and prompt each up to max_response_chars)
    per_item = (2 * cfg.max_response_chars + cfg.max_reference_chars + MAX_ID_CHARS) * _BYTES_PER_CHAR + 1024
    return min(cfg.max_items * per_item + 1024, cfg.max_request_mb << 20)


class BodySizeLimit:
    """Refuses a request whose Content-Length no valid request can reach, before its body is read (413)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if length.isdigit() and int(length) > self.max_bytes:
                response = JSONResponse({"detail": f"request body of {int(length)} bytes is over the limit of "
                                                   f"{self.max_bytes} bytes"}, status_code=413)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 (413 for a limit exceeded) with each error's location and message, never the offending input."""
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    status = 413 if any(e["type"] in _OVERSIZE_ERRORS for e in errors) else 422
    return JSONResponse({"detail": errors}, status_code=status)


def create_app(cfg: RewardConfig, math_verify_timeout_s: int | None = None) -> FastAPI:
    """The reward server app; its grading pool starts with the app's lifespan and stops with it.

    `math_verify_timeout_s` overrides math-verify's own per-call alarm (default: one second past
    `cfg.grade_timeout_s`, so the pool's kill is what bounds an item).
    """
    registry = CollectorRegistry()
    metrics = RewardMetrics(registry)
    grader = Grader(cfg, metrics, math_verify_timeout_s)
    started_at = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker_vm_mb = await grader.start()
        log.info("reward server: %d grading workers (address space %.0f of %d MB), %.1f s per item, auth %s",
                 cfg.grader_procs, worker_vm_mb, cfg.worker_mem_mb, cfg.grade_timeout_s,
                 "on" if cfg.token else "off")
        try:
            yield
        finally:
            await asyncio.to_thread(grader.close)
            log.info("reward server: grading pool stopped")

    app = FastAPI(title="orz-async reward server", lifespan=lifespan,
                  description="Rule-based 0/1 correctness reward (ORZ): the last \\boxed{} answer, "
                              "checked with math-verify in killable worker processes.")
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes(cfg))
    app.add_exception_handler(RequestValidationError, _validation_error)
    # The bearer scheme is declared (and checked) only when a token is configured, so that the OpenAPI
    # document says what the server does.
    auth: list = []
    if cfg.token is not None:
        bearer = HTTPBearer(auto_error=False)

        async def check_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
            if credentials is None or not secrets.compare_digest(credentials.credentials.encode(),
                                                                 cfg.token.encode()):
                raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

        auth = [Depends(check_token)]

    grade_request = request_model(cfg)

    @app.post("/v1/grade", response_model=GradeResponse, dependencies=auth, responses=ERROR_RESPONSES)
    async def grade(body: grade_request) -> dict:  # type: ignore[valid-type]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(grader.grade_one(item.id, item.response, item.reference, item.truncated,
                                                           item.task_type)
                                         for item in body.items))
        metrics.request_latency.observe(time.perf_counter() - t0)
        metrics.request_items.observe(len(results))
        return {"results": [asdict(r) for r in results]}

    add_openrlhf_route(app, cfg, grader, metrics, auth, ERROR_RESPONSES)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "pid": os.getpid(), "workers": cfg.grader_procs, "in_flight": grader.in_flight,
                "uptime_s": round(time.time() - started_at, 1)}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus_metrics() -> Response:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # several uvicorn workers: every worker's series, summed
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return Response(generate_latest(merged), media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def app_from_env() -> FastAPI:
    """The app of one uvicorn worker process (`--workers` > 1): its settings come from the `ORZ__` environment
    the parent exported."""
    return create_app(load_config().reward)


def serve(cfg: Config) -> None:
    """`orz reward-server`: runs the app with uvicorn on `reward.host:reward.port` until SIGINT/SIGTERM."""
    rc = cfg.reward
    log.info("reward server for run %s listening on http://%s:%d (%d uvicorn worker(s) × %d grading processes)",
             cfg.run_name, rc.host, rc.port, rc.workers, rc.grader_procs)
    if rc.workers == 1:
        uvicorn.run(create_app(rc), host=rc.host, port=rc.port, log_config=None, access_log=False,
                    timeout_graceful_shutdown=5)
        return
    # Worker processes are spawned afresh: they read the config from the environment, and write their metric
    # values to a shared directory that /metrics (answered by any one of them) sums (prometheus_client's
    # multiprocess mode).
    with tempfile.TemporaryDirectory(prefix="orz-reward-metrics-") as metrics_dir:
        os.environ.update(config_to_env(cfg))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        uvicorn.run("reward_server.app:app_from_env", factory=True, workers=rc.workers, host=rc.host,
                    port=rc.port, log_config=None, access_log=False, timeout_graceful_shutdown=5)

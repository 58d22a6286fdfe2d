"""`orz eval --bench math500,aime2024,gpqa_diamond,gsm8k`: a model on the standard benchmarks in data/.

Per benchmark: every problem (or the first `limit`) rendered with the prompt template, `n` samples each at
`eval.temperature` from the generator engine (vLLM by default), graded by the reward server with the
benchmark's grader (math / choice / numeric). Reported as ORZ reports them: pass@1 is the mean reward over
all samples (ORZ averages 16), pass@k the unbiased estimate 1 − C(n−c, k)/C(n, k) averaged over problems,
plus the mean response length in tokens and the truncation rate (samples that hit `eval.max_tokens`).
Prompts that do not fit the engine's `max_model_len` with room to answer are counted as `skipped`.

The reward server is the one at `reward.url`, or one started here for the duration (`orz reward-server`).
`oracle=True` answers every problem with its gold answer in ORZ's format instead of sampling a model: it
checks the extraction, grading and scoring path end to end (every benchmark must score 100 %).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from generator.reward_client import GradeItem, RewardClient
from services.config import Config
from services.config_io import config_to_env
from services.datasets import bench_records, render, template
from services.metrics import free_port, wait_healthy
from services.protocol import SamplingParams

log = logging.getLogger("orz.eval")
GRADE_CHUNK = 256  # items per /v1/grade request (the server caps a request at reward.max_items)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@contextmanager
def reward_server(cfg: Config):
    """The configured reward server, or a local one for the duration."""
    if cfg.reward.url:
        yield cfg.reward.url
        return
    port = free_port()
    env = {**os.environ, **config_to_env(cfg), "ORZ__REWARD__PORT": str(port), "ORZ__REWARD__HOST": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "reward-server"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 120, proc, "the local reward server")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def _gold_response(answer: str) -> str:
    return f"<think>The answer follows.</think> <answer>\\boxed{{{answer}}}</answer>"


def evaluate_benches(cfg: Config, model: Path | None, benches: list[str], *, n: int, ks: list[int],
                     limit: int | None = None, template_name: str = "orz_base", oracle: bool = False,
                     out: Path | None = None, console: Console | None = None) -> dict:
    ec, gc = cfg.eval, cfg.generator
    if not oracle and model is None:
        raise ValueError("a --model is needed (or --oracle)")
    if any(k > n for k in ks):
        raise ValueError(f"pass@k needs k <= n samples, got k={max(ks)} with n={n}")
    tmpl = template(template_name)
    engine = tokenizer = None
    if not oracle:
        from transformers import AutoTokenizer

        from generator.engine import make_engine

        tokenizer = AutoTokenizer.from_pretrained(str(model))
        engine = make_engine(gc, model, seed=gc.seed)
    params = SamplingParams(ec.temperature, 1.0, ec.max_tokens, tuple(cfg.sampling.stop))
    results: dict = {"model": "oracle (gold answers)" if oracle else str(model), "n": n, "template": template_name,
                     "temperature": ec.temperature, "max_tokens": ec.max_tokens, "benchmarks": {}}
    with reward_server(cfg) as url:
        client = RewardClient(url, cfg.reward.request_timeout_s, cfg.reward.token, cfg.reward.retry_s)
        try:
            for name in benches:
                bench, records = bench_records(name, limit)
                t0 = time.time()
                prompts = [render(tmpl, r.question) for r in records]
                skipped = 0
                if oracle:
                    texts = [[_gold_response(r.answer)] * n for r in records]
                    lengths = [[0] * n for _ in records]
                    truncated = [[False] * n for _ in records]
                    kept = records
                else:
                    assert tokenizer is not None and engine is not None
                    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
                    room = gc.max_model_len - ec.max_tokens
                    keep = [i for i, x in enumerate(ids) if len(x) <= room]
                    skipped = len(records) - len(keep)
                    kept = [records[i] for i in keep]
                    outs = engine.generate([ids[i] for i in keep], [params] * len(keep), [n] * len(keep)) if keep \
                        else []
                    texts = [[c.text for c in comps] for comps in outs]
                    lengths = [[len(c.token_ids) for c in comps] for comps in outs]
                    truncated = [[c.finish_reason == "length" for c in comps] for comps in outs]
                items = [GradeItem(f"{pi}/{si}", text, r.answer, bench.task_type, truncated[pi][si])
                         for pi, r in enumerate(kept) for si, text in enumerate(texts[pi])]
                grades = {g.id: g for i in range(0, len(items), GRADE_CHUNK)
                          for g in client.grade(items[i:i + GRADE_CHUNK])}
                correct = [sum(grades[f"{pi}/{si}"].reward for si in range(n)) for pi in range(len(kept))]
                samples = len(kept) * n
                verdicts: dict[str, int] = {}
                for g in grades.values():
                    verdicts[g.verdict] = verdicts.get(g.verdict, 0) + 1
                results["benchmarks"][name] = {
                    "problems": len(kept), "skipped": skipped, "grader": bench.task_type,
                    "pass@1": sum(correct) / samples if samples else 0.0,
                    **{f"pass@{k}": (sum(pass_at_k(n, int(c), k) for c in correct) / len(kept) if kept else 0.0)
                       for k in ks if k != 1},
                    "mean_response_tokens": sum(map(sum, lengths)) / samples if samples else 0.0,
                    "truncation_rate": sum(map(sum, truncated)) / samples if samples else 0.0,
                    "verdicts": verdicts, "seconds": round(time.time() - t0, 2),
                }
                log.info("%s: pass@1 %.3f over %d problems × %d samples", name,
                         results["benchmarks"][name]["pass@1"], len(kept), n)
        finally:
            client.close()
    (console or Console()).print(results_table(results, ks))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    return results


def results_table(results: dict, ks: list[int]) -> Table:
    table = Table(title=f"{results['model']} — {results['n']} samples/problem, temperature {results['temperature']}")
    table.add_column("benchmark")
    table.add_column("problems", justify="right")
    for k in ks:
        table.add_column(f"pass@{k}", justify="right")
    table.add_column("mean length", justify="right")
    table.add_column("truncated", justify="right")
    for name, r in results["benchmarks"].items():
        problems = f"{r['problems']}" + (f" (+{r['skipped']} skipped)" if r["skipped"] else "")
        table.add_row(name, problems, *[f"{100 * r[f'pass@{k}']:.1f}" for k in ks],
                      f"{r['mean_response_tokens']:.1f}", f"{100 * r['truncation_rate']:.1f}%")
    return table

"""`orz eval`: accuracy of one or more models on the held-out problems, graded by the reward server.

Accuracy is the mean 0/1 reward over `eval.samples` samples per problem at `eval.temperature` (ORZ reports
accuracy averaged over 16 samples). One vLLM engine serves every model: the first is loaded at start-up,
the others are swapped in with the same in-place reload the generators use.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from transformers import AutoTokenizer

from generator.engine import make_engine
from generator.reward_client import GradeItem, RewardClient
from services.config import Config
from services.protocol import SamplingParams
from services.tasks import all_problems, eval_set

log = logging.getLogger("orz.eval")


def evaluate(cfg: Config, models: list[Path], out: Path | None = None) -> dict[str, dict]:
    if not cfg.reward.url:
        raise ValueError("reward.url is not set: evaluation grades through a reward server")
    tc, ec, gc = cfg.task, cfg.eval, cfg.generator
    problems = eval_set(all_problems(tc.min_terms, tc.max_terms, tc.max_operand), tc.eval_size, tc.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(models[0]))
    prompt_ids = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in problems]
    params = SamplingParams(ec.temperature, 1.0, ec.max_tokens, tuple(cfg.sampling.stop))
    samples = ec.samples if ec.temperature > 0 else 1
    engine = make_engine(gc, models[0], seed=gc.seed)
    client = RewardClient(cfg.reward.url, cfg.reward.request_timeout_s, cfg.reward.token, cfg.reward.retry_s)
    results: dict[str, dict] = {}
    try:
        for i, model in enumerate(models):
            if i > 0:
                engine.load_weights_from_dir(model)
            t0 = time.time()
            outs = engine.generate(prompt_ids, [params] * len(problems), [samples] * len(problems))
            items = [GradeItem(f"{pi}/{si}", c.text, str(p.answer), tc.task_type, c.finish_reason == "length")
                     for pi, (p, comps) in enumerate(zip(problems, outs)) for si, c in enumerate(comps)]
            grades = client.grade(items)
            verdicts: dict[str, int] = {}
            for g in grades:
                verdicts[g.verdict] = verdicts.get(g.verdict, 0) + 1
            acc = sum(g.reward for g in grades) / len(grades)
            results[str(model)] = {"accuracy": acc, "problems": len(problems), "samples_per_problem": samples,
                                   "temperature": ec.temperature, "verdicts": verdicts,
                                   "seconds": round(time.time() - t0, 2)}
            log.info("%s: accuracy %.3f on %d held-out problems × %d samples", model, acc, len(problems), samples)
    finally:
        client.close()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    return results

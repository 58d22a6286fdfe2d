"""Generator throughput through the whole path against bare vLLM on the same prompts, in one run.

- `bare`: `VllmEngine.generate` on all prompts at once in this process (the engine's best case).
- `system`: a real `orz generator` process pulling the same PromptTasks from an embedded Redis, sampling
  with continuous batching, grading through a real `orz reward-server`, publishing TrajectoryGroups. Timed
  from the generator's first heartbeat (engine ready) to the last group in the trajectory stream.
Both use the same engine settings and thread count, one after the other (never concurrently). Prints JSON
with tokens/s of each and their ratio.

    python bench/generator_throughput.py --prompts 384 --samples 8 [--max-inflight 96]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from generator_backends import timed
from transformers import AutoTokenizer

from services.config_io import config_to_env, load_config
from services.control import ControlPlane, Keys
from services.metrics import free_port, wait_healthy
from services.protocol import PromptTask, SamplingParams, TrajectoryGroup
from services.queue import StreamQueue
from services.redis_client import connect
from services.redis_server import EmbeddedRedis
from services.tasks import all_problems, split

ROOT = Path(__file__).resolve().parents[1]


def bare_tokens_per_s(cfg, prompt_ids: list[list[int]], params: SamplingParams, n: int) -> dict:
    from generator.engine import VllmEngine

    gc = cfg.generator
    engine = VllmEngine(cfg.model.path, dtype=gc.dtype, max_model_len=gc.max_model_len, kv_cache_mb=gc.kv_cache_mb,
                        seed=0, threads=gc.threads)
    return timed(engine, prompt_ids, params, n)


def system_tokens_per_s(cfg, tasks: list[PromptTask], timeout_s: float) -> dict:
    children: list[subprocess.Popen] = []
    with EmbeddedRedis() as redis_server:
        cfg.redis.url = redis_server.url
        cfg.reward.port = free_port()
        cfg.reward.url = f"http://127.0.0.1:{cfg.reward.port}"
        env = {**os.environ, **config_to_env(cfg)}
        client = connect(cfg.redis.url)
        keys = Keys(cfg.namespace)
        prompts = StreamQueue(client, keys.prompts, "generators", PromptTask, keys.dead)
        prompts.ensure_group()
        try:
            children.append(subprocess.Popen([sys.executable, "-m", "services.cli", "reward-server"], env=env,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_healthy(cfg.reward.url, 60, children[-1], "the reward server")
            for task in tasks:
                prompts.add(task)
            children.append(subprocess.Popen([sys.executable, "-m", "services.cli", "generator"], env=env,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.time() + timeout_s
            while ControlPlane(client, keys).generator_count() == 0:  # first heartbeat: the engine is up
                if time.time() > deadline or children[-1].poll() is not None:
                    raise RuntimeError("generator did not start")
                time.sleep(0.05)
            t0 = time.perf_counter()
            while client.xlen(keys.trajectories) < len(tasks):
                if time.time() > deadline or children[-1].poll() is not None:
                    raise RuntimeError("generator did not finish the prompts")
                time.sleep(0.02)
            seconds = time.perf_counter() - t0
            groups = [TrajectoryGroup.from_fields(fields)
                      for _, fields in client.xrange(keys.trajectories, count=len(tasks) + 10)]
        finally:
            for child in reversed(children):
                child.terminate()
                child.wait(30)
    tokens = sum(len(s.response_ids) for g in groups for s in g.samples)
    rewards = [s.reward for g in groups for s in g.samples]
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "groups": len(groups), "reward_mean": round(sum(rewards) / len(rewards), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--prompts", type=int, default=384)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--timeout-s", type=float, default=600)
    ap.add_argument("--max-inflight", type=int, default=None,
                    help="generator.max_inflight_requests (and prompts_per_batch); default: all prompts, as bare "
                    "vLLM has them")
    args = ap.parse_args()
    inflight = args.max_inflight or args.prompts
    cfg = load_config(args.config, overrides={
        "run_name": f"bench-gen-{os.getpid()}",
        "generator": {"max_inflight_requests": inflight, "prompts_per_batch": inflight}})
    if not (cfg.model.path / "config.json").exists():
        raise SystemExit(f"no base model at {cfg.model.path}: run `orz make-base-model -c {args.config}` first")
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.model.path))
    train, _ = split(all_problems(cfg.task.min_terms, cfg.task.max_terms, cfg.task.max_operand))
    problems = train[: args.prompts]
    s = cfg.sampling
    params = SamplingParams(s.temperature, s.top_p, s.max_tokens, tuple(s.stop))
    prompt_ids = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in problems]
    tasks = [PromptTask(f"{i}:{p.task_id}", p.prompt, str(p.answer), cfg.task.task_type, args.samples, params, 0,
                        tuple(ids)) for i, (p, ids) in enumerate(zip(problems, prompt_ids))]

    bare = bare_tokens_per_s(cfg, prompt_ids, params, args.samples)
    system = system_tokens_per_s(cfg, tasks, args.timeout_s)
    print(json.dumps({
        "benchmark": "generator_throughput", "prompts": args.prompts, "samples_per_prompt": args.samples,
        "threads": cfg.generator.threads, "max_inflight_requests": cfg.generator.max_inflight_requests,
        "bare_vllm": bare, "system": system,
        "ratio": round(system["tokens_per_s"] / bare["tokens_per_s"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()

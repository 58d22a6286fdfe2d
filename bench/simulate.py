"""Cluster-scale simulation: the real services with the GPU work replaced by cost models.

Real: redis-server, the prompt and trajectory streams, the feeder and its admission control (AReaL's rule),
the generators' loop (continuous batching, backpressure, heartbeats, publishing, acks), the wire protocol
with real-sized payloads, the learner's loop (reading, validation, staleness drops, versions) and the
weight-sync group (a real gloo group formed over the live generators each time membership changes, carrying
a stand-in tensor). Modelled (services/costmodel.py): decode/prefill time on each generator's GPU, the
training step on the learner's GPUs, the NCCL broadcast of the real weights, the load into the engine and
the reward server's latency. Every modelled duration is slept × `--time-scale`, so a 60 s step takes 3 s at
0.05; Redis, the protocol and scheduling run at their real speed, so their share of each step is
over-counted by 1/time-scale (the reported figures are conservative).

Generators run as threads, `--per-proc` to a process. Reports (JSON, and a PNG for `--sweep`):
- achieved steps/hour (simulated time) over the steps after the pipeline has filled;
- the ideal pipeline bound 1 / max(generation time per batch / generators, train time per batch), with
  generation at a full engine's steady tokens/s (services/costmodel.py) and the mean response length;
- the synchronous schedule, run the same way: `max_staleness` 0, every GPU generating (one generator per GPU
  group) then every GPU training, as a colocated synchronous system does;
- orchestration overhead per step: CPU seconds of the learner process and of Redis per step (sleep is free),
  against the simulated step time, and the generators' CPU seconds per published group.

    python bench/simulate.py --preset areal-1.5b --steps 10
    python bench/simulate.py --preset orz-7b --sweep 2,4,8,16,32,64 --plot docs/simulate.png
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from services.config_io import load_config
from services.costmodel import QWEN25_7B, R1_DISTILL_15B, CostModel, LengthModel
from services.redis_client import connect
from services.redis_server import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("orz.simulate")


@dataclass(frozen=True)
class Preset:
    description: str
    cost: CostModel
    lengths: LengthModel
    generators: int  # one per `cost.tp` GPUs
    batch_prompts: int
    n_samples: int
    prompt_len: int
    max_staleness: int
    time_scale: float
    sources: tuple[str, ...]
    inflight_batches: float | None = None  # learner.max_inflight_prompts in batches; None: AReaL's s + 1
    engine_queue_samples: int | None = None  # generator.engine_queue_samples


PRESETS = {
    # AReaL v0.3's end-to-end comparison (blog/AReaL_v0_3.md, Table 2): R1-Distill-Qwen-1.5B, 16 nodes of
    # 8 H800 (= H100 compute and HBM), batch 512 prompts × 16 samples, 8192 new tokens at most, 1000 PPO
    # steps in 41.0 h synchronous vs 14.8 h asynchronous (2.77×). Async split: 8 nodes generate, 8 train (the
    # split that balances the two under this cost model); decoupled PPO without a critic (8 FLOPs/param/token).
    "areal-1.5b": Preset(
        "AReaL v0.3 math setting: R1-Distill-Qwen-1.5B, 128 H800, 512 x 16 samples, 8k tokens",
        CostModel(R1_DISTILL_15B, tp=1, train_gpus=64, train_flops_per_token=8.0),
        LengthModel(median=4500, sigma=0.6, max_tokens=8192),
        generators=64, batch_prompts=512, n_samples=16, prompt_len=150, max_staleness=4, time_scale=0.25,
        sources=("AReaL v0.3 blog, Table 2 and the staleness ablation's settings (github.com/inclusionAI/AReaL, "
                 "blog/AReaL_v0_3.md)",
                 "response lengths: log-normal, median 4.5k, sigma 0.6, capped at 8192 (about 16% truncated): "
                 "an assumption for a distilled reasoning model under an 8k cap"),
        # 4 batches in flight, not AReaL's 5: at 5 (or 4.5) the groups holding an 8k-token sample, which alone
        # takes about 4 steps to generate, reach staleness 5 and are dropped (33 and 42 of 6,144 in 12 steps, at
        # 0.94 of the ideal bound); at 4 none are, at 0.86 (2026-12-02). Prompts wait unstamped in the generator
        # while the engine is full (engine_queue_samples), not in the engine's queue.
        inflight_batches=4.0, engine_queue_samples=16,
    ),
    # ORZ-7B's recipe (configs/orz-7b.yaml): Qwen2.5-7B, 128 prompts × 64 samples, 8k tokens, PPO-GAE with
    # a critic of the same size (14 FLOPs/param/token); 64 single-GPU generators and 64 training GPUs.
    "orz-7b": Preset(
        "ORZ-7B recipe: Qwen2.5-7B, 128 x 64 samples, 8k tokens, 64 training GPUs + 1-GPU generators",
        CostModel(QWEN25_7B, tp=1, train_gpus=64, train_flops_per_token=14.0),
        LengthModel(median=1000, sigma=0.7, max_tokens=8192),
        generators=64, batch_prompts=128, n_samples=64, prompt_len=200, max_staleness=2, time_scale=0.1,
        sources=("ORZ paper and configs/orz-7b.yaml (batch, samples, lengths, PPO-GAE with critic)",
                 "response lengths: log-normal, median 1k, sigma 0.7 (mean ~1.3k): ORZ-7B's mid-training "
                 "average response length is of this order (ORZ paper, Fig. 2)"),
    ),
    # A small setting for tests/integration/test_simulate.py: seconds, not minutes.
    "smoke": Preset(
        "smoke test: 1.5B shapes, 16 prompts x 4 samples, short responses",
        CostModel(R1_DISTILL_15B, tp=1, train_gpus=8, train_flops_per_token=8.0, max_num_seqs=16),
        LengthModel(median=400, sigma=0.5, max_tokens=1024),
        generators=4, batch_prompts=16, n_samples=4, prompt_len=50, max_staleness=1, time_scale=0.2,
        sources=("none: a plumbing check",),
    ),
}


# -- generator worker processes -------------------------------------------------------------------------------
# Started with subprocess and a JSON spec (nothing pickled between processes); stopped by a file appearing.
def _worker(spec_path: Path) -> None:
    import os

    from generator.sim_engine import SimEngine, SimRewardClient
    from generator.worker import Generator
    from services.config import Config

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s sim-gen %(name)s %(levelname)s %(message)s")
    spec = json.loads(spec_path.read_text())
    preset = PRESETS[spec["preset"]]
    cfg = Config.model_validate(spec["config"])
    scale, chars = spec["time_scale"], spec["chars_per_token"]
    gens = []
    for gid in spec["ids"]:
        seed = (int(gid.rsplit("-", 1)[1]) * 7919 + os.getpid()) % 2**31

        def factory(gc, path, seed=seed, **_):
            return SimEngine(preset.cost, preset.lengths, scale, seed, chars_per_token=chars)

        gens.append(Generator(cfg, gid, engine_factory=factory, reward=SimRewardClient(preset.cost, scale, seed + 1)))
    threads = [threading.Thread(target=g.run, name=g.id, daemon=True) for g in gens]
    cpu0 = time.process_time()
    for t in threads:
        t.start()
    stop = Path(spec["stop_file"])
    while not stop.exists() and any(t.is_alive() for t in threads):
        time.sleep(0.2)
    for g in gens:
        g.stop_event.set()
    for t in threads:
        t.join(timeout=30)
    engines = [g.engine for g in gens if g.engine is not None]
    Path(spec["result_file"]).write_text(json.dumps({
        "cpu_s": time.process_time() - cpu0, "generators": len(gens),
        "groups": sum(g.metrics.registry.get_sample_value("orz_generator_groups_total") or 0 for g in gens),
        "busy_s": sum(g.busy_s for g in gens), "simulated_s": sum(e.simulated_s for e in engines),
        "preempted": sum(e.preempted for e in engines), "alive": sum(t.is_alive() for t in threads),
        "decoded_tokens": sum(e.decoded_tokens for e in engines), "iterations": sum(e.iterations for e in engines),
    }))


# -- one simulated run ----------------------------------------------------------------------------------------
def simulate(preset_name: str, *, generators: int, train_gpus: int, staleness: int, steps: int, scale: float,
             per_proc: int, chars_per_token: int, redis_url: str, run_dir: Path, name: str,
             overcommit: float = 2, inflight_batches: float | None = None) -> dict:
    import subprocess

    from learner.sim import sim_learner

    preset = PRESETS[preset_name]
    cost = replace(preset.cost, train_gpus=train_gpus)
    # Prompts in each engine: twice what fills max_num_seqs, so finished sequences are replaced at once (a
    # prompt holds its slot until its longest sample ends). More queues sequences so long that they are
    # stamped with a version several steps old before they start, and are dropped as stale.
    prompts_per_gen = math.ceil(overcommit * max(1, math.ceil(cost.max_num_seqs / preset.n_samples)))
    cfg = load_config(None, overrides={
        "run_name": name, "run_dir": str(run_dir),
        "redis": {"url": redis_url, "block_ms": 200, "socket_timeout_s": 60, "claim_idle_ms": 3_600_000},
        "reward": {"url": "sim://cost-model"},
        "sampling": {"max_tokens": preset.lengths.max_tokens, "stop": []},
        "generator": {"num": generators, "max_inflight_requests": prompts_per_gen, "heartbeat_s": 2.0,
                      "max_model_len": preset.prompt_len + preset.lengths.max_tokens,
                      "prompts_per_batch": max(1, min(prompts_per_gen,
                                                      math.ceil(preset.batch_prompts / generators))),
                      "weight_wait_s": 600.0, "engine_queue_samples": preset.engine_queue_samples},
        "learner": {"total_steps": steps, "batch_prompts": preset.batch_prompts, "n_samples": preset.n_samples,
                    "max_staleness": staleness, "checkpoint_every": 0, "eval_every": 0, "wait_timeout_s": 3600,
                    "max_inflight_prompts": None if inflight_batches is None or staleness == 0
                    else math.ceil(inflight_batches * preset.batch_prompts)},
        "weight_sync": {"backend": "gloo", "timeout_s": 120},
    })
    work = run_dir / f"{name}-workers"
    work.mkdir(parents=True, exist_ok=True)
    stop_file = work / "stop"
    ids = [f"sim-{i:03d}" for i in range(generators)]
    procs, result_files = [], []
    for k, i in enumerate(range(0, generators, per_proc)):
        spec = {"preset": preset_name, "config": cfg.model_dump(mode="json"), "time_scale": scale,
                "chars_per_token": chars_per_token, "ids": ids[i:i + per_proc], "stop_file": str(stop_file),
                "result_file": str(work / f"result-{k}.json")}
        (work / f"spec-{k}.json").write_text(json.dumps(spec))
        result_files.append(work / f"result-{k}.json")
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                                       str(work / f"spec-{k}.json")], cwd=ROOT))
    learner = sim_learner(cfg, cost, scale, preset.prompt_len, train_gpus)
    redis = connect(redis_url)
    redis.config_resetstat()  # per-command Redis CPU (INFO commandstats) counts this run only
    t0 = time.time()
    try:
        learner.run()
    finally:
        stop_file.write_text("stop")
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    wall = time.time() - t0
    gen_stats = [json.loads(f.read_text()) for f in result_files if f.exists()]
    records = [json.loads(x) for x in (cfg.run_path / "metrics.jsonl").read_text().splitlines()]
    out = _report(staleness, cost, records, gen_stats, generators, scale, wall)
    out["redis_commands"] = _commandstats(redis, len(records))
    out["stale_drops"] = _stale_drops(cfg.run_path / "tasks.jsonl")
    return out


def _stale_drops(ledger: Path) -> dict:
    """Where the dropped groups' staleness came from, in versions (means over the drops): waiting to start
    after they were fed (fed → first token), generating (first → last token), and queued before the learner
    read them (last token → the version that dropped them)."""
    fed: dict[str, int] = {}
    parts: list[tuple[int, int, int]] = []
    for line in ledger.read_text().splitlines():
        e = json.loads(line)
        if e["event"] in ("fed", "refed"):
            fed[e["task_id"]] = e["version"]
        elif e["event"] == "dropped_stale" and "policy_version" in e:
            f, first, last = fed[e["task_id"]], e["policy_version"], e["policy_version_last"]
            parts.append((first - f, last - first, e["version"] - last))
    if not parts:
        return {"groups": 0}
    n = len(parts)
    return {"groups": n, "versions_fed_to_first_token": sum(p[0] for p in parts) / n,
            "versions_generating": sum(p[1] for p in parts) / n,
            "versions_queued_after_last_token": sum(p[2] for p in parts) / n}


def _commandstats(client, steps: int, top: int = 8) -> dict:
    """Where Redis's CPU went, per training step: calls and CPU µs of the busiest commands."""
    stats = client.info("commandstats")
    rows = sorted(((k.removeprefix("cmdstat_"), v) for k, v in stats.items()), key=lambda kv: -kv[1]["usec"])
    return {name: {"calls_per_step": round(v["calls"] / steps, 1), "cpu_ms_per_step": round(v["usec"] / steps / 1e3, 2),
                   "usec_per_call": round(v["usec_per_call"], 1)} for name, v in rows[:top]}


def engine_rate(preset: Preset, prompts: int = 400) -> float:
    """Tokens/s of one engine kept full (the cost model alone: no Redis, no learner, no sleeping)."""
    from generator.sim_engine import SimEngine
    from services.protocol import SamplingParams

    engine = SimEngine(preset.cost, preset.lengths, 0.0, seed=0, chars_per_token=0)
    params = SamplingParams(1.0, 1.0, preset.lengths.max_tokens)
    for i in range(prompts):
        engine.submit(f"p{i}", [1] * preset.prompt_len, params, preset.n_samples)
    while engine.waiting:  # measured while the queue keeps the engine full
        engine.step()
    return engine.decoded_tokens / engine.simulated_s


def ideal(preset: Preset, cost: CostModel, generators: int) -> dict:
    """The pipeline bound: generation spread perfectly over the generators, each at a full engine's rate."""
    mean_len = preset.lengths.mean()
    samples = preset.batch_prompts * preset.n_samples
    gen_tokens = samples * mean_len
    rate = engine_rate(preset)
    gen_s = gen_tokens / (generators * rate)
    train_s = cost.train_s(samples * (preset.prompt_len + mean_len))
    return {"gen_s_per_batch": gen_s, "train_s_per_batch": train_s, "step_s": max(gen_s, train_s),
            "steps_per_hour": 3600 / max(gen_s, train_s), "decode_tok_s_per_generator": rate,
            "mean_response_tokens": mean_len}


def _report(staleness: int, cost: CostModel, records: list[dict], gen_stats: list[dict], generators: int,
            scale: float, wall: float) -> dict:
    warm = max(1, min(len(records) - 2, 1 + staleness))  # steps the pipeline takes to fill
    window = records[warm:]
    span_real = window[-1]["time"] - records[warm - 1]["time"]
    sim_step = span_real / len(window) / scale
    overhead_cpu = [r["learner_cpu_s"] for r in window if "learner_cpu_s" in r]
    redis_cpu = [r["redis_cpu_s"] for r in window if "redis_cpu_s" in r]
    groups = sum(s["groups"] for s in gen_stats)
    gen_cpu = sum(s["cpu_s"] for s in gen_stats)
    learner_cpu = sum(overhead_cpu) / len(overhead_cpu)
    redis = sum(redis_cpu) / len(redis_cpu)
    return {
        "generators": generators, "train_gpus": cost.train_gpus, "steps": len(records), "measured_steps": len(window),
        "wall_s": round(wall, 1), "time_scale": scale,
        "step_s": sim_step, "steps_per_hour": 3600 / sim_step,
        "train_s_per_step": sum(r["stats"]["simulated_train_s"] for r in window) / len(window),
        "staleness_mean": sum(r["staleness_mean"] for r in window) / len(window),
        "dropped_stale": records[-1]["dropped_stale_total"],
        "learner_cpu_s_per_step": learner_cpu, "redis_cpu_s_per_step": redis,
        "overhead_fraction": (learner_cpu + redis) / sim_step,
        "generator_cpu_s_per_group": gen_cpu / max(1, groups),
        "generator_busy_fraction": sum(s["busy_s"] for s in gen_stats) / max(1e-9, wall * generators),
        "preempted": sum(s["preempted"] for s in gen_stats),
        "engine_mean_running": sum(s["decoded_tokens"] for s in gen_stats)
        / max(1, sum(s["iterations"] for s in gen_stats)),
        "engine_tok_s_simulated": sum(s["decoded_tokens"] for s in gen_stats)
        / max(1e-9, sum(s["simulated_s"] for s in gen_stats)),
    }


def run_setting(preset: Preset, args, generators: int, redis_url: str, run_dir: Path) -> dict:
    cost = preset.cost
    gpus = generators * cost.tp + cost.train_gpus
    common = {"scale": args.time_scale or preset.time_scale, "per_proc": args.per_proc,
              "chars_per_token": args.chars_per_token, "redis_url": redis_url, "run_dir": run_dir,
              "overcommit": args.overcommit, "inflight_batches": preset.inflight_batches
              if args.inflight_batches is None else args.inflight_batches}
    out = {"async": simulate(args.preset, generators=generators, train_gpus=cost.train_gpus,
                             staleness=preset.max_staleness, steps=args.steps, name=f"async-{generators}", **common)}
    out["ideal"] = ideal(preset, cost, generators)
    out["async"]["of_ideal"] = out["async"]["steps_per_hour"] / out["ideal"]["steps_per_hour"]
    out["async"]["inflight_prompts"] = math.ceil((common["inflight_batches"] or preset.max_staleness + 1)
                                                 * preset.batch_prompts)
    if args.depths:  # the same run at other in-flight depths: drops against throughput
        out["by_inflight_batches"] = {}
        for depth in (float(x) for x in args.depths.split(",")):
            run = simulate(args.preset, generators=generators, train_gpus=cost.train_gpus,
                           staleness=preset.max_staleness, steps=args.steps, name=f"async-{generators}-d{depth}",
                           **{**common, "inflight_batches": depth})
            run["of_ideal"] = run["steps_per_hour"] / out["ideal"]["steps_per_hour"]
            out["by_inflight_batches"][str(depth)] = {k: run[k] for k in (
                "of_ideal", "dropped_stale", "staleness_mean", "engine_mean_running", "overhead_fraction",
                "stale_drops")}
    if not args.no_sync:
        # Colocated synchronous: every GPU generates the batch (one generator per tp GPUs), then every GPU trains.
        out["sync"] = simulate(args.preset, generators=gpus // cost.tp, train_gpus=gpus, staleness=0,
                               steps=max(3, args.steps // 2), name=f"sync-{generators}", **common)
        out["speedup_over_sync"] = out["async"]["steps_per_hour"] / out["sync"]["steps_per_hour"]
    out["gpus"] = gpus
    return out


def plot(sweep: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [s["async"]["generators"] for s in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(g, [s["async"]["steps_per_hour"] for s in sweep], "o-", label="achieved (async, simulated)")
    ax.plot(g, [s["ideal"]["steps_per_hour"] for s in sweep], "k--", label="ideal pipeline bound")
    if all("sync" in s for s in sweep):
        ax.plot(g, [s["sync"]["steps_per_hour"] for s in sweep], "s-", label="synchronous, same GPUs")
    ax.set_xscale("log", base=2)
    ax.set_xticks(g, [str(x) for x in g])
    ax.set_xlabel("generators (1 GPU each)")
    ax.set_ylabel("PPO steps / hour")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="areal-1.5b")
    ap.add_argument("--generators", type=int, help="default: the preset's")
    ap.add_argument("--sweep", help="comma-separated generator counts; plots throughput vs generators")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--time-scale", type=float, help="default: the preset's")
    ap.add_argument("--per-proc", type=int, default=16, help="generator threads per process")
    ap.add_argument("--chars-per-token", type=int, default=4, help="response text shipped per token")
    ap.add_argument("--no-sync", action="store_true", help="skip the synchronous baseline")
    ap.add_argument("--overcommit", type=float, default=2,
                    help="prompts per engine, as a multiple of what fills max_num_seqs")
    ap.add_argument("--inflight-batches", type=float,
                    help="learner.max_inflight_prompts in batches (default: max_staleness + 1, AReaL's rule)")
    ap.add_argument("--depths", default="", help="comma-separated in-flight depths (batches) to run async at too")
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return {}
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    preset = PRESETS[args.preset]
    counts = [int(x) for x in args.sweep.split(",")] if args.sweep else [args.generators or preset.generators]
    with EmbeddedRedis(extra_args=("--save", "", "--appendonly", "no")) as server, \
            tempfile.TemporaryDirectory(prefix="orz-sim-") as tmp:
        connect(server.url).ping()
        runs = [run_setting(preset, args, g, server.url, Path(tmp)) for g in counts]
    result = {"bench": "simulate", "preset": args.preset, "setting": preset.description,
              "cost_model": preset.cost.describe(), "lengths": {**preset.lengths.__dict__,
                                                                 "mean": preset.lengths.mean(),
                                                                 "truncated": preset.lengths.truncated_fraction()},
              "batch": {"prompts": preset.batch_prompts, "samples": preset.n_samples, "prompt_len": preset.prompt_len,
                        "max_staleness": preset.max_staleness},
              "sources": list(preset.sources), "runs": runs}
    if args.plot:
        plot(runs, args.plot, preset.description)
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()

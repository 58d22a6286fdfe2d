"""Every benchmark, one after the other, as one JSON document: printed, written to bench/results/<date>.json,
and (with `--readme`) rendered into the README's performance table between its `bench:start` / `bench:end`
markers. Each benchmark runs as its own process and compares against a baseline measured in the same run.

    python bench/run_all.py --readme            # everything (about 20 minutes on 2 cores)
    python bench/run_all.py --only transport,simulate
    python bench/run_all.py --readme --from bench/results/2026-11-25.json   # re-render a saved run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from readme_block import replace_block

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _f(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def _learner(r: dict) -> tuple[str, str, str]:
    return (f"{_f(r['overhead_ratio'], 3)}× of bare passes", f"≤ {r['goal_ratio']}×",
            f"{r['params_actor'] / 1e6:.1f}M-param actor+critic, {r['sequences']} seqs, "
            f"{r['critic_steps']} critic steps")


def _generator(r: dict) -> tuple[str, str, str]:
    return (f"{_f(r['ratio'], 3)}× of bare vLLM", "≥ 0.9×",
            f"{_f(r['system']['tokens_per_s'], 0)} vs {_f(r['bare_vllm']['tokens_per_s'], 0)} tok/s, "
            f"{r['prompts']} prompts × {r['samples_per_prompt']}")


def _backends(r: dict) -> tuple[str, str, str]:
    best = r["transformers"][str(r["transformers_best_max_num_seqs"])]
    return (f"{_f(r['ratio'], 3)}× of transformers", f"≥ {r['goal_ratio']}×",
            f"{_f(r['vllm']['tokens_per_s'], 0)} vs {_f(best['tokens_per_s'], 0)} tok/s, "
            f"{r['params'] / 1e6:.1f}M params, {r['max_tokens']} tokens")


def _reward(r: dict) -> tuple[str, str, str]:
    return (f"{_f(r['ratio'], 3)}× of a bare pool; p99 {r['latency_one_client']['request_p99_ms']} ms; "
            f"1% hostile {_f(r['hostile_ratio'], 3)}×", "≥ 0.8×; < 200 ms; ≥ 0.7×",
            f"{_f(r['http']['grades_per_s'], 0)} vs {_f(r['direct_pool']['grades_per_s'], 0)} grades/s")


def _isolation(r: dict) -> tuple[str, str, str]:
    now, seal = r["modes"]["preload_seal_watch"], r["modes"]["seal"]
    wrong = seal["differences_by_kind"].get("correct -> wrong", 0)
    return (f"{now['differences']} of {r['pairs']:,} verdicts differ from math-verify; "
            f"{_f(now['ratio_to_unsealed'], 3)}× of unsealed grades/s", "0; ≥ 0.9×",
            f"seal alone (before): {seal['differences']:,} differ, {wrong:,} correct answers graded wrong; "
            f"server {now['server']['rss_mb']:.0f} vs {seal['server']['rss_mb']:.0f} MB RSS, start "
            f"{now['start_s']:.1f} vs {seal['start_s']:.1f} s")


def _weight_sync(r: dict) -> tuple[str, str, str]:
    sweep = ", ".join(f"{mb} MB {v['broadcast_s']:.2f} s" for mb, v in sorted(r.get("by_bucket_mb", {}).items(),
                                                                           key=lambda kv: int(kv[0])))
    return (f"{_f(r['ratio'], 3)}× of raw TCP", f"≥ {r['goal_ratio']}×",
            f"{_f(r['broadcast_GBps'])} vs {_f(r['raw_tcp_GBps'])} GB/s, {r['params'] / 1e6:.0f}M params to "
            f"{r['receivers']} receivers, {r.get('transport_threads', 1)} gloo threads, {r['bucket_mb']} MB buckets "
            f"({sweep})")


def _transport(r: dict) -> tuple[str, str, str]:
    return (f"{_f(r['ratio_queue_over_raw'], 3)}× of raw XADD/XREADGROUP/XACK; codec "
            f"{_f(r['codec_over_raw'], 1)}× raw's MB/s", "≥ 0.8×; ≥ 5×",
            f"{_f(r['queue']['groups_per_s'], 1)} groups/s ({_f(r['queue']['mb_s'], 0)} MB/s) vs "
            f"{_f(r['raw']['mb_s'], 0)} MB/s raw; codec {_f(r['codec']['encode_decode_mb_s'], 0)} MB/s; "
            f"{r['payload']['samples']} × ≤{r['payload']['tokens_max']} tokens, "
            f"{r['payload']['mb_per_group']:.2f} MB a group")


def _async(r: dict) -> tuple[str, str, str]:
    a, s = r["async"], r["sync"]
    gen = "n/a" if a["generator_busy"] is None else f"{a['generator_busy']:.2f}"
    gen_s = "n/a" if s["generator_busy"] is None else f"{s['generator_busy']:.2f}"
    return (f"{_f(r['speedup_steps_per_hour'], 2)}× steps/hour", "(measured)",
            f"async {_f(a['steps_per_hour'], 0)} vs sync {_f(s['steps_per_hour'], 0)} steps/h; learner busy "
            f"{a['learner_busy']:.2f} vs {s['learner_busy']:.2f}; generators busy {gen} vs {gen_s}; reward "
            f"{a['reward_last']:.2f} vs {s['reward_last']:.2f} (last 5 steps)")


def _simulate(r: dict) -> tuple[str, str, str]:
    run = r["runs"][-1]
    a = run["async"]
    sync = f"; {_f(run['speedup_over_sync'], 2)}× over synchronous" if "speedup_over_sync" in run else ""
    depths = "; ".join(f"at {d} batches in flight {v['of_ideal']:.3f} and {v['dropped_stale']} dropped"
                       for d, v in run.get("by_inflight_batches", {}).items())
    return (f"{_f(a['of_ideal'], 3)} of the ideal bound; overhead {100 * a['overhead_fraction']:.2f}% of a step; "
            f"{a['dropped_stale']} dropped as stale{sync}", "≥ 0.95; < 1%; 0",
            f"{r['preset']}: {a['generators']} generators + {a['train_gpus']} training GPUs, "
            f"{a.get('inflight_prompts', '?')} prompts in flight, {_f(a['steps_per_hour'], 1)} steps/h simulated; "
            f"learner {a['learner_cpu_s_per_step']:.2f} + Redis {a['redis_cpu_s_per_step']:.2f} CPU s a step"
            + (f"; {depths}" if depths else ""))


# name → (command line, headline extractor, what it compares)
BENCHES: dict[str, tuple[list[str], Callable[[dict], tuple[str, str, str]], str]] = {
    "learner": (["bench/learner_throughput.py", "--critic-steps", "12", "--repeats", "3"], _learner,
                "full PPO iteration vs bare forward/backward passes"),
    "generator": (["bench/generator_throughput.py", "--prompts", "384"], _generator,
                  "Redis → vLLM → reward server → Redis vs bare vLLM generate"),
    "generator_backends": (["bench/generator_backends.py"], _backends, "vLLM vs the transformers fallback"),
    "reward": (["bench/reward.py", "--items", "2000", "--procs", "2"], _reward,
               "reward server over HTTP vs a bare process pool"),
    "grading_isolation": (["bench/grading_isolation.py"], _isolation,
                          "sealed grading workers vs unsealed ones and vs math-verify in a plain process"),
    "weight_sync": (["bench/weight_sync.py", "--bucket-mb", "512", "--sweep", "64,128,256"], _weight_sync,
                    "gloo broadcast of a 0.5B-shaped model vs raw TCP"),
    "transport": (["bench/transport.py", "--groups", "64"], _transport,
                  "TrajectoryGroups through the queue vs raw Redis stream calls"),
    "async_e2e": (["bench/async_e2e.py", "--steps", "30"], _async,
                  "tiny run, max_staleness 2 vs 0, same processes and seeds"),
    "simulate": (["bench/simulate.py", "--preset", "areal-1.5b", "--steps", "12", "--depths", "4.5,5"], _simulate,
                 "cluster-scale simulation vs its ideal bound and the synchronous schedule"),
}


def run_one(name: str) -> dict:
    cmd, _, _ = BENCHES[name]
    t0 = time.time()
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=3600,
                          check=False)
    if proc.returncode != 0:
        return {"error": f"exit code {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
    out = proc.stdout
    start = out.find("\n{") + 1 if not out.startswith("{") else 0
    result, _ = json.JSONDecoder().raw_decode(out[start:])
    result["_seconds"] = round(time.time() - t0, 1)
    return result


def table(doc: dict) -> str:
    lines = [f"Generated by `python bench/run_all.py --readme` from `bench/results/{doc['date']}.json` "
             f"({doc['machine']}).", "",
             "| benchmark | compares | result | goal | detail |", "|---|---|---|---|---|"]
    for name, (_, headline, what) in BENCHES.items():
        r = doc["results"].get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {name} | {what} | failed: {r['error']} | | |")
            continue
        result, goal, detail = headline(r)
        lines.append(f"| {name} | {what} | **{result}** | {goal} | {detail} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated benchmark names: " + ",".join(BENCHES))
    ap.add_argument("--readme", action="store_true", help="render the README's table from the results")
    ap.add_argument("--from", dest="from_file", type=Path, help="render a saved results file instead of running")
    args = ap.parse_args(argv)
    if args.from_file:
        doc = json.loads(args.from_file.read_text())
    else:
        names = args.only.split(",") if args.only else list(BENCHES)
        unknown = set(names) - set(BENCHES)
        if unknown:
            raise SystemExit(f"unknown benchmarks: {sorted(unknown)}")
        import os
        import platform

        date = dt.date.today().isoformat()
        path = RESULTS / f"{date}.json"
        doc = json.loads(path.read_text()) if path.exists() else {"date": date, "results": {}}
        doc["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
        for name in names:
            print(f"running {name} …", file=sys.stderr, flush=True)
            doc["results"][name] = run_one(name)
            RESULTS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=1) + "\n")  # partial results survive an interruption
    if args.readme:
        replace_block("bench", table(doc))
    print(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()

"""The async advantage on this machine: the tiny config run asynchronously (`max_staleness` 2) and
synchronously (`max_staleness` 0), same processes, seeds and step count, one after the other.

Each side is a real `orz up` (Redis, reward server, 2 vLLM generators, the PPO-GAE learner). From each run's
metrics.jsonl, over the steps after the first (start-up excluded):
- steps/hour;
- learner busy fraction: time in the training step (batch build, forward, backward, optimiser) over wall time;
- generator busy fraction: engine-step time with requests in flight over wall time, from the generators'
  heartbeats (`busy_s`), averaged over generators;
- reward reached: mean train reward over the last `--window` steps (and the first, for reference).
The ratio async / sync of steps/hour is the speed-up. On 2 shared cores the learner and the generators
contend for the same CPUs, so overlap buys less than on separate GPUs: the simulation (bench/simulate.py)
is where cluster-scale numbers come from. Prints JSON.

    python bench/async_e2e.py --steps 30
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from orz_up import orz_up

ROOT = Path(__file__).resolve().parents[1]


def run_once(run_dir: Path, name: str, staleness: int, steps: int, config: Path, extra: list[str]) -> dict:
    wall_s = orz_up(config, run_dir, name, [f"learner.total_steps={steps}", f"learner.max_staleness={staleness}",
                                            "learner.checkpoint_every=0", *extra], skip_eval=True)
    records = [json.loads(x) for x in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
    return summarize(records, wall_s)


def generator_busy(first: dict, last: dict) -> float | None:
    """Mean over generators present at both ends of Δbusy_s / Δts."""
    a, b = first.get("generator_activity") or {}, last.get("generator_activity") or {}
    fractions = [(b[g][0] - a[g][0]) / (b[g][1] - a[g][1]) for g in a.keys() & b.keys() if b[g][1] > a[g][1]]
    return sum(fractions) / len(fractions) if fractions else None


def summarize(records: list[dict], wall_s: float, window: int = 5) -> dict:
    first, last = records[0], records[-1]
    span = last["time"] - first["time"]
    later = records[1:]
    return {
        "steps": len(records), "wall_s": round(wall_s, 1), "measured_s": round(span, 1),
        "steps_per_hour": len(later) / span * 3600,
        "learner_busy": sum(r["train_s"] for r in later) / span,
        "generator_busy": generator_busy(first, last),
        "reward_first": sum(r["reward_mean"] for r in records[:window]) / window,
        "reward_last": sum(r["reward_mean"] for r in records[-window:]) / window,
        "staleness_mean": sum(r["staleness_mean"] for r in later) / len(later),
        "dropped_stale": last["dropped_stale_total"],
        "step_s_median": sorted(r["step_time_s"] for r in later)[len(later) // 2],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml")
    ap.add_argument("--async-staleness", type=int, default=2)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra key=value for both runs")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="orz-bench-async-") as tmp:
        run_dir = Path(tmp)
        sync = run_once(run_dir, "sync", 0, args.steps, args.config, args.extra)
        asyn = run_once(run_dir, "async", args.async_staleness, args.steps, args.config, args.extra)
    result = {
        "bench": "async_e2e", "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT)
                                             else args.config), "steps": args.steps,
        "sync": {"max_staleness": 0, **sync},
        "async": {"max_staleness": args.async_staleness, **asyn},
        "speedup_steps_per_hour": asyn["steps_per_hour"] / sync["steps_per_hour"],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

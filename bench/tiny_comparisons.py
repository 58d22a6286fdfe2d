"""The comparisons on the tiny task (README, "Results"), several seeds each: PPO-GAE (the default) against GRPO,
`max_staleness` 0 / 1 / 2 / 4, `learner.is_correction` none against token, and the DAPO family: GRPO with
DAPO's set (dynamic sampling, clip-higher 0.28, token mean, soft overlong punishment) and Dr. GRPO.

Every run is a real `orz up -c configs/tiny.yaml` (Redis, reward server, 2 vLLM generators, the learner, the
held-out evaluation of the base and the trained model), differing from the default only by the `--set`
pairs below and the seed (`learner.seed` and `generator.seed`; the base model, the prompt order and the
held-out problems are the same for all). From each run, first 10 vs last 10 steps: train reward and mean
response length; held-out accuracy of the trained model; mean staleness; wall time. Each variant reports
mean ± sample sd over seeds and its difference from the default (the baseline measured in the same
invocation). Prints JSON, writes bench/results/tiny-comparisons-<date>.json and a plot of the seed-mean
curves per comparison under docs/.

    python bench/tiny_comparisons.py                    # 6 variants x 3 seeds, about 80 minutes on 2 cores
    python bench/tiny_comparisons.py --only default,grpo --seeds 1
    python bench/tiny_comparisons.py --only default,grpo,dapo,drgrpo --plots dapo   # the DAPO table, about 45 minutes
    python bench/tiny_comparisons.py --from bench/results/tiny-comparisons-2026-12-01.json --readme
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from orz_up import orz_up  # noqa: E402
from readme_block import replace_block  # noqa: E402

from learner.plot import plot_comparison  # noqa: E402

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("PPO-GAE, staleness 1, is_correction token (default)", []),
    "grpo": ("GRPO, staleness 1", ["learner.advantage=grpo"]),
    "s0": ("PPO-GAE, staleness 0", ["learner.max_staleness=0"]),
    "s2": ("PPO-GAE, staleness 2", ["learner.max_staleness=2"]),
    "s4": ("PPO-GAE, staleness 4", ["learner.max_staleness=4"]),
    "none": ("PPO-GAE, staleness 1, is_correction none", ["learner.is_correction=none"]),
    "dapo": ("GRPO with DAPO's set: filter_groups, clip-higher 0.28, token mean, overlong buffer 16",
             ["learner.advantage=grpo", "learner.filter_groups=zero_variance", "learner.clip_eps_high=0.28",
              "learner.loss_agg=token_mean", "learner.overlong_buffer_tokens=16", "learner.overlong_penalty=1.0"]),
    "drgrpo": ("Dr. GRPO: no std scaling, token sums / max_tokens",
               ["learner.advantage=grpo", "learner.grpo_scale_by_std=false",
                "learner.loss_agg=seq_mean_token_sum_norm"]),
}
COMPARISONS = {"estimator": ["default", "grpo"], "staleness": ["s0", "default", "s2", "s4"],
               "is_correction": ["default", "none"], "dapo": ["default", "grpo", "dapo", "drgrpo"]}
FIGURES = ("reward_first", "reward_last", "length_first", "length_last", "heldout_base", "heldout_trained",
           "staleness_mean", "wall_s", "filtered_per_step")


def run_once(run_dir: Path, variant: str, seed: int, config: Path) -> dict:
    name = f"{variant}-s{seed}"
    wall_s = orz_up(config, run_dir, name, ["learner.checkpoint_every=0", f"learner.seed={seed}",
                                            f"generator.seed={seed}", *VARIANTS[variant][1]])
    summary = json.loads((run_dir / name / "summary.json").read_text())
    records = [json.loads(x) for x in (run_dir / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {
        "variant": variant, "seed": seed, "run": str(run_dir / name),
        "reward_first": summary["reward_first_steps"], "reward_last": summary["reward_last_steps"],
        "length_first": summary["response_len_first_steps"], "length_last": summary["response_len_last_steps"],
        "heldout_base": summary["base_accuracy"], "heldout_trained": summary["trained_accuracy"],
        "staleness_mean": summary["staleness_mean"], "wall_s": round(wall_s, 1),
        "filtered_per_step": statistics.fmean(r.get("filtered_groups", 0) for r in records),
    }


def aggregate(runs: list[dict]) -> dict[str, dict]:
    """Per variant and figure: mean and sample sd over seeds; and the mean's difference from the default."""
    out: dict[str, dict] = {}
    for variant in VARIANTS:
        rows = [r for r in runs if r["variant"] == variant]
        if not rows:
            continue
        out[variant] = {"label": VARIANTS[variant][0], "seeds": len(rows)}
        for f in FIGURES:
            values = [r.get(f, 0.0) for r in rows]  # runs saved before a figure existed count it as 0
            out[variant][f] = {"mean": statistics.fmean(values),
                               "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    if "default" in out:
        for agg in out.values():
            agg["vs_default"] = {f: agg[f]["mean"] - out["default"][f]["mean"]
                                 for f in ("reward_last", "length_last", "heldout_trained", "wall_s")}
    return out


def seed_mean_history(run_paths: list[str]) -> list[dict]:
    """Per-step mean over seeds of the plotted figures (runs have the same step count)."""
    histories = [[json.loads(x) for x in (Path(p) / "metrics.jsonl").read_text().splitlines()] for p in run_paths]
    steps = min(len(h) for h in histories)
    keys = ("reward_mean", "response_len_mean", "staleness_mean")
    return [{"step": histories[0][i]["step"], **{k: statistics.fmean(h[i][k] for h in histories) for k in keys}}
            for i in range(steps)]


def plot(runs: list[dict], docs: Path, names: list[str]) -> list[str]:
    written = []
    for name in names:
        variants = COMPARISONS[name]
        curves = {VARIANTS[v][0]: seed_mean_history([r["run"] for r in runs if r["variant"] == v])
                  for v in variants if any(r["variant"] == v for r in runs)}
        if len(curves) > 1:
            out = docs / f"tiny-{name}.png"
            plot_comparison(curves, out)
            written.append(str(out.relative_to(ROOT)))
    return written


def _pm(agg: dict, f: str, digits: int) -> str:
    return f"{agg[f]['mean']:.{digits}f} ± {agg[f]['sd']:.{digits}f}"


def markdown(doc: dict, order: list[str] | None = None, filtered: bool = False) -> str:
    agg = doc["variants"]
    lines = [f"Generated by `python bench/tiny_comparisons.py --readme` from "
             f"`bench/results/{doc['file']}` ({doc['seeds']} seeds each, mean ± sd; first 10 → last 10 steps).", "",
             "| run | train reward, first 10 → last 10 | response length (tokens), first 10 → last 10 | "
             "held-out accuracy, trained (base " + _pm(agg["default"], "heldout_base", 3) + ") | "
             "mean staleness | wall time |" + (" filtered groups per step |" if filtered else ""),
             "|---|---|---|---|---|---|" + ("---|" if filtered else "")]
    order = order or ["default", "grpo", "s0", "s2", "s4", "none"]
    for v in [v for v in order if v in agg]:
        a = agg[v]
        lines.append(f"| {a['label']} | {_pm(a, 'reward_first', 3)} → {_pm(a, 'reward_last', 3)} | "
                     f"{_pm(a, 'length_first', 1)} → {_pm(a, 'length_last', 1)} | {_pm(a, 'heldout_trained', 3)} | "
                     f"{a['staleness_mean']['mean']:.2f} | {_pm(a, 'wall_s', 0)} s |"
                     + (f" {_pm(a, 'filtered_per_step', 2)} |" if filtered else ""))
    return "\n".join(lines)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "cmp")
    ap.add_argument("--from", dest="from_file", type=Path, help="re-render a saved result instead of running")
    ap.add_argument("--readme", action="store_true", help="render the README table between its markers")
    ap.add_argument("--plots", help="comma-separated comparisons to plot (default: every one whose variants all ran)")
    args = ap.parse_args()
    if args.from_file:
        doc = json.loads(args.from_file.read_text())
    else:
        unknown = set(args.only.split(",")) - set(VARIANTS)
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
        runs = []
        for seed in range(args.seeds):  # seed-major, so a cut-short invocation has every variant at some seeds
            for variant in args.only.split(","):
                runs.append(run_once(args.run_dir, variant, seed, args.config))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        date = dt.date.today().isoformat()
        doc = {"benchmark": "tiny_comparisons", "date": date, "file": f"tiny-comparisons-{date}.json",
               "seeds": args.seeds, "config": str(args.config.relative_to(ROOT)), "runs": runs,
               "variants": aggregate(runs)}
        ran = {r["variant"] for r in runs}
        names = args.plots.split(",") if args.plots else [n for n, vs in COMPARISONS.items() if set(vs) <= ran]
        doc["plots"] = plot(runs, ROOT / "docs", names)
        out = ROOT / "bench" / "results" / doc["file"]
        out.write_text(json.dumps(doc, indent=2))
    if args.readme:
        if all(v in doc["variants"] for v in ("default", "grpo", "s0", "s2", "s4", "none")):
            replace_block("tiny-comparisons", markdown(doc))
        if any(v in doc["variants"] for v in ("dapo", "drgrpo")):
            replace_block("dapo-comparisons", markdown(doc, ["default", "grpo", "dapo", "drgrpo"], filtered=True))
    print(json.dumps(doc["variants"], indent=2))


if __name__ == "__main__":
    main()

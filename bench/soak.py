"""Soak run: the tiny stack (real Redis with AOF, reward server, learner, two vLLM generators) for `--minutes`,
with generator 1 killed (SIGKILL) every `--kill-every` seconds and restarted 5 s later under its id, while
generator 0 lives through the whole run (and through every re-formed weight-sync group).

Every `--sample-s` it records the resident memory of every process (a process and its children: the reward
server with its grading workers), Redis's `used_memory` and the length of each stream. At the end the
learner is stopped, the run's accounting is checked (tests/support/harness.py: nothing lost, nothing trained
twice), and it prints JSON: each process's RSS at the start and end of the measured window and its slope
(MB per minute, least squares, leaving out each process's own first `--warmup-min`; over the second half of
that window alone; and of each minute's lowest RSS, the floor a leak would raise), Redis memory and stream
lengths at their highest, and the accounting. `--plot` draws the memory curves.

    python bench/soak.py --minutes 20 --kill-every 120 --out bench/results/soak-<date>.json --plot docs/soak.png
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.harness import Stack, check_accounting  # noqa: E402


def _rss_mb(pid: int) -> float | None:
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20
    except psutil.NoSuchProcess:
        return None


def _floor(points: list[tuple[float, float]], window_s: float = 60.0) -> list[tuple[float, float]]:
    """The lowest value in each `window_s` window (at the window's middle)."""
    if not points:
        return []
    t0, bucket = points[0][0], {}
    for t, y in points:
        k = int((t - t0) // window_s)
        bucket[k] = min(bucket.get(k, y), y)
    return [(t0 + (k + 0.5) * window_s, y) for k, y in sorted(bucket.items())]


def _slope_mb_per_min(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    t = np.array([p[0] for p in points]) / 60.0
    y = np.array([p[1] for p in points])
    return float(np.polyfit(t, y, 1)[0])


def soak(minutes: float, kill_every: float, sample_s: float, warmup_min: float, workdir: Path) -> dict:
    stack = Stack(workdir, "soak", steps=10_000_000, batch=4)
    samples: list[dict] = []
    kills = []
    with stack:
        stack.wait_steps(1)
        t0 = time.time()  # the soak's minutes count from the first step, not from the processes' start-up
        r = stack.client()
        next_kill = time.time() + kill_every
        while time.time() - t0 < minutes * 60:
            stack.check_alive("during the soak")
            now = time.time()
            if now >= next_kill:
                gen = stack.generators[1]
                gen.signal(signal.SIGKILL)
                kills.append({"t": round(now - t0, 1), "generator": gen.name, "steps": len(stack.records())})
                time.sleep(5)
                gen.restart()
                next_kill = time.time() + kill_every
            row = {"t": round(time.time() - t0, 1), "steps": len(stack.records()),
                   "redis_used_mb": r.info("memory")["used_memory"] / 2**20,
                   "xlen": {name: r.xlen(key) for name, key in (("prompts", stack.keys.prompts),
                                                               ("trajectories", stack.keys.trajectories),
                                                               ("dead", stack.keys.dead))},
                   "rss_mb": {p.name + (f"#{p.p.pid}" if p.name.startswith("gen") else ""): _rss_mb(p.p.pid)
                              for p in stack.procs if p.alive}}
            row["rss_mb"]["redis"] = _rss_mb(stack.redis.pid)
            samples.append(row)
            time.sleep(sample_s)
        stack.stop_learner()
        counts = check_accounting(stack, final="STOPPED")

    # Each process's own first `warmup_min` are left out (a restarted generator has its own start-up).
    first_seen: dict[str, float] = {}
    series: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        for name, mb in s["rss_mb"].items():
            if mb is None:
                continue
            first_seen.setdefault(name, s["t"])
            if s["t"] >= first_seen[name] + warmup_min * 60:
                series.setdefault(name, []).append((s["t"], mb))
    window = [s for s in samples if s["t"] >= warmup_min * 60]
    processes = {
        name: {"start_mb": round(pts[0][1], 1), "end_mb": round(pts[-1][1], 1), "minutes": round(
            (pts[-1][0] - pts[0][0]) / 60, 1), "slope_mb_per_min": _round(_slope_mb_per_min(pts), 3),
            # the second half alone: warm-up that ends late (allocator pools, caches) versus steady growth
            "last_half_slope_mb_per_min": _round(_slope_mb_per_min(
                [p for p in pts if p[0] >= (pts[0][0] + pts[-1][0]) / 2]), 3),
            # the lowest RSS of each minute: the floor a leak would raise (between the learner's and the
            # generators' heap trims, RSS also holds the freed peak of the last steps)
            "floor_slope_mb_per_min": _round(_slope_mb_per_min(_floor(pts)), 3)}
        for name, pts in series.items() if len(pts) >= 3
    }
    steps = samples[-1]["steps"]
    return {
        "minutes": minutes, "kill_every_s": kill_every, "kills": len(kills), "steps": steps,
        "steps_per_min": round(steps / minutes, 1), "warmup_min": warmup_min, "processes": processes,
        "redis_used_mb_max": round(max(s["redis_used_mb"] for s in samples), 2),
        "redis_used_mb_end": round(samples[-1]["redis_used_mb"], 2),
        "redis_used_mb_slope_per_min": _round(_slope_mb_per_min([(s["t"], s["redis_used_mb"]) for s in window]), 4),
        "xlen_max": {k: max(s["xlen"][k] for s in samples) for k in ("prompts", "trajectories", "dead")},
        "max_inflight_prompts": stack.cfg.max_inflight_prompts,
        "accounting": counts, "kill_log": kills, "samples": samples,
    }


def _round(x: float | None, n: int) -> float | None:
    return None if x is None else round(x, n)


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = sorted({n for s in result["samples"] for n in s["rss_mb"]})
    for name in names:
        pts = [(s["t"] / 60, s["rss_mb"][name]) for s in result["samples"] if s["rss_mb"].get(name) is not None]
        if len(pts) > 2:
            ax.plot(*zip(*pts), label=name.split("#")[0] if not name.startswith("gen") else name, lw=1)
    for k in result["kill_log"]:
        ax.axvline(k["t"] / 60, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB, process + children)")
    ax.set_title(f"soak: {result['minutes']:.0f} min, a generator killed every {result['kill_every_s']:.0f} s")
    ax.legend(fontsize=6, ncol=2)
    t = [s["t"] / 60 for s in result["samples"]]
    ax2.plot(t, [s["redis_used_mb"] for s in result["samples"]], label="Redis used_memory (MB)")
    ax2.plot(t, [s["xlen"]["trajectories"] for s in result["samples"]], label="XLEN trajectories")
    ax2.plot(t, [s["xlen"]["prompts"] for s in result["samples"]], label="XLEN prompts")
    ax2.set_xlabel("minutes")
    ax2.legend(fontsize=7)
    ax2.set_title("Redis: memory and stream lengths (trimmed after ack)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--kill-every", type=float, default=120.0, help="seconds between generator kills")
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--warmup-min", type=float, default=2.0, help="each process's start-up, left out of its slope")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--keep-samples", action="store_true", help="keep every sample in the JSON")
    args = ap.parse_args()
    warmup = args.warmup_min
    with tempfile.TemporaryDirectory(prefix="orz-soak-") as tmp:
        result = soak(args.minutes, args.kill_every, args.sample_s, warmup, Path(tmp))
    if args.plot:
        plot(result, args.plot)
    if not args.keep_samples:
        result.pop("samples")
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

"""What the grading workers' isolation costs, and whether it changes verdicts: three ways to run them, measured.

Each mode is a real `orz reward-server` process (2 grading processes); the workload is the differential
test's generated pairs (tests/support/answer_forms.py: equivalent and changed forms made with sympy),
graded over HTTP by 8 clients in requests of 64 items and compared, pair by pair, with math-verify's
`verify(parse(gold), parse(answer))` in this (plain) process.
- `unsealed`: workers with only the address-space cap, no descriptor seal (the reference for cost);
- `seal`: the descriptor seal alone, as the server ran before (its grading modules not loaded first, no watch);
- `seal_watch`: the seal and the audit-hook watch, modules still not loaded first: what the watch catches;
- `preload_seal_watch`: what the server runs now: every grading module loaded before the pool forks, the
  seal, and the watch that answers `error` for a comparison that needed a file.
Reported per mode: start-up to healthy, server and worker memory (RSS, and PSS: a worker's share of the
pages it shares copy-on-write with the server), grades/s, and the verdicts that differ from math-verify's.

    python bench/grading_isolation.py [--per-category 210] [--readme]   # --readme: the README's table too
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from math_verify import parse, verify  # noqa: E402
from readme_block import replace_block  # noqa: E402
from reward import http  # noqa: E402

from services.metrics import free_port, wait_healthy  # noqa: E402
from tests.support.answer_forms import generate  # noqa: E402

# Each mode starts the CLI after changing one thing in the process, as tests/support/faulty_reward_server.py
# does; `now` changes nothing.
_NO_PRELOAD = "import reward_server.grading as g\ng.preload_grading_modules = lambda: (0, 0.0)\n"
_NO_WATCH = "import contextlib, reward_server.graders as r\nr.fault_watch = lambda: contextlib.nullcontext([])\n"
MODES = {
    "unsealed": "import reward_server.grading as g, reward_server.sandbox as s\n"
                "g.init_worker = lambda mem_mb: s.resource.setrlimit(s.resource.RLIMIT_AS, (mem_mb << 20, -1))\n",
    "seal": _NO_PRELOAD + _NO_WATCH,
    "seal_watch": _NO_PRELOAD,
    "preload_seal_watch": "",
}
LAUNCH = "import sys\n{patch}from services.cli import app\nsys.argv = ['orz', 'reward-server', *sys.argv[1:]]\napp()\n"


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        out += [int(p) for p in task.read_text().split()]
    return out


def _memory_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) / 1024
    return {"rss_mb": round(fields["Rss"], 1), "pss_mb": round(fields["Pss"], 1)}


def run_mode(name: str, pairs: list, plain: list[bool], clients: int, batch: int) -> dict:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORZ__")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH.format(patch=MODES[name]), "--port", str(port),
                             "--grader-procs", "2"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 120, proc, f"reward server ({name})")
        start_s = time.perf_counter() - t0
        items = [{"id": str(i), "response": f"<answer>\\boxed{{{p.answer}}}</answer>", "reference": p.reference,
                  "task_type": "math"} for i, p in enumerate(pairs)]
        graded = http(url, items, batch, clients)  # bench/reward.py's clients
        workers = [_memory_mb(w) for w in _children(proc.pid)]
        server = _memory_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    verdicts = graded["verdicts"]
    differ = Counter(f"{'correct' if ok else 'wrong'} -> {verdicts[str(i)]}" for i, ok in enumerate(plain)
                     if verdicts[str(i)] != ("correct" if ok else "wrong"))
    return {"start_s": round(start_s, 2), "server": server, "workers": workers,
            "grades_per_s": graded["grades_per_s"], "differences": sum(differ.values()),
            "differences_by_kind": dict(differ)}


LABELS = {"unsealed": "no descriptor seal (address-space cap only)",
          "seal": "descriptor seal alone (the server before the fix)",
          "seal_watch": "seal + watch, modules not loaded first",
          "preload_seal_watch": "**modules loaded first + seal + watch (now)**"}


def table(doc: dict) -> str:
    lines = [f"{doc['pairs']:,} pairs ({doc['equivalent']:,} equivalent), measured {doc['date']}:", "",
             "| workers | verdicts ≠ math-verify | of which | grades/s (× unsealed) | start-up | server RSS | "
             "worker RSS / PSS |", "|---|---|---|---|---|---|---|"]
    for name, m in doc["modes"].items():
        kinds = ", ".join(f"{k}: {v:,}" for k, v in m["differences_by_kind"].items()) or "—"
        w = m["workers"][0] if m["workers"] else {"rss_mb": float("nan"), "pss_mb": float("nan")}
        lines.append(f"| {LABELS[name]} | {m['differences']:,} | {kinds} | {m['grades_per_s']:.1f} "
                     f"({m['ratio_to_unsealed']:.2f}×) | {m['start_s']:.1f} s | {m['server']['rss_mb']:.0f} MB | "
                     f"{w['rss_mb']:.0f} / {w['pss_mb']:.0f} MB |")
    return "\n".join(lines)


def render_readme(doc: dict) -> None:
    replace_block("isolation", table(doc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-category", type=int, default=210)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--readme", action="store_true", help="render the README's isolation table")
    args = ap.parse_args()
    pairs = generate(args.per_category, seed=0)
    t0 = time.perf_counter()
    plain = [verify(parse("$" + p.reference + "$"), parse("$" + p.answer + "$")) for p in pairs]
    plain_rate = len(pairs) / (time.perf_counter() - t0)
    modes = {name: run_mode(name, pairs, plain, args.clients, args.batch) for name in MODES}
    base = modes["unsealed"]["grades_per_s"]
    for m in modes.values():
        m["ratio_to_unsealed"] = round(m["grades_per_s"] / base, 3)
    doc = {"benchmark": "grading_isolation", "date": dt.date.today().isoformat(), "pairs": len(pairs),
           "equivalent": sum(p.equivalent for p in pairs),
           "plain_math_verify": {"grades_per_s_one_process": round(plain_rate, 1), "true": sum(plain)},
           "modes": modes}
    if args.readme:
        render_readme(doc)
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()

"""Where the orchestration CPU goes at cluster scale: py-spy over the simulation's learner and generators.

Runs `bench/simulate.py` (the real learner loop, Redis and generator loops with the GPU work modelled) under
`py-spy record --subprocesses`, sampling only running threads (sleeping is free), and sorts every sample into
the part of the path it was spent in, walking its stack from the innermost frame out: the wire codec, Redis
calls (redis-py and hiredis, socket I/O included), the learner's checks on a group, the feeder, weight sync,
the cost model that stands in for the GPU (not part of the real system's CPU), and the rest. Prints JSON:
CPU seconds per training step for the learner process and for one generator process (of `--per-proc`
generators), by part, with the busiest functions.

    python bench/profile_sim.py --preset areal-1.5b --steps 8 --out bench/results/profile-after.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RATE = 100  # samples per second of a running thread

# (part, pattern on one frame "function (path:line)"), tried from the innermost frame outwards.
PARTS = [
    ("protocol decode", re.compile(r"(from_bytes|from_fields|_decode|unframe|_unpack\w*|_view\w*|_sample_columns|"
                                   r"_str_list|decode) \(.*services/(protocol|envelope)")),
    ("protocol encode", re.compile(r"(to_bytes|to_fields|build|frame|_pack\w*|_payload|_arrays|_column|encode\w*) "
                                   r"\(.*services/(protocol|envelope)")),
    ("redis calls", re.compile(r"/(redis|hiredis)/")),
    ("intake checks", re.compile(r"invalid_group|_admit \(")),
    ("feeder", re.compile(r"learner/feeder\.py")),
    ("weight sync", re.compile(r"services/(weight_sync|membership)\.py")),
    ("cost model (stands in for the GPU)",
     re.compile(r"generator/sim_engine\.py|services/costmodel\.py|learner/sim\.py")),
    ("metrics and logging", re.compile(r"prometheus_client|/logging/|learner/tracking\.py|json/")),
]


def part_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, pattern in PARTS:
            if pattern.search(frame):
                return name
    return "other"


def leaf(stack: list[str]) -> str:
    frame = stack[-1]
    return re.sub(r"\(/.*?/(site-packages|lib/python3\.\d+|main|ci)/", "(", frame)


def summarise(raw: Path, steps: int) -> dict:
    kinds: dict[str, dict] = {}
    procs: dict[str, str] = {}
    for line in raw.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        frames = stack_text.split(";")
        # py-spy nests a child process's stacks under its parent's: the innermost "process" frame says whose
        starts = [i for i, f in enumerate(frames) if f.startswith("process ")]
        if not starts or starts[-1] == len(frames) - 1:
            continue
        root, frames = frames[starts[-1]], frames[starts[-1] + 1:]
        pid = root.split(":", 1)[0]
        kind = "generator process" if "--worker" in root else "learner" if "simulate.py" in root else None
        if kind is None:
            continue
        procs.setdefault(pid, kind)
        if kind == "generator process" and pid != next(p for p, k in procs.items() if k == kind):
            continue  # one generator process is enough: they all run the same loop
        if any("importlib._bootstrap" in f for f in frames):
            continue  # start-up imports, once per process
        if any(f.startswith(("ideal (", "engine_rate (", "_report (", "_stale_drops (", "_commandstats (",
                             "plot (")) for f in frames):
            continue  # the report's own work after the simulation (the ideal bound's cost-model run, the ledger)
        k = kinds.setdefault(kind, {"parts": Counter(), "leaves": Counter(), "samples": 0})
        n = int(count)
        k["parts"][part_of(frames)] += n
        k["leaves"][leaf(frames)] += n
        k["samples"] += n
    out = {}
    for kind, k in kinds.items():
        out[kind] = {
            "cpu_s_per_step": round(k["samples"] / RATE / steps, 3),
            "parts_cpu_s_per_step": {p: round(n / RATE / steps, 3) for p, n in k["parts"].most_common()},
            "top_functions": [[f, round(n / RATE / steps, 3)] for f, n in k["leaves"].most_common(12)],
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="areal-1.5b")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--per-proc", type=int, default=16)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--label", default="")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="orz-prof-") as tmp:
        raw = Path(tmp) / "raw.txt"
        sim_json = Path(tmp) / "sim.json"
        cmd = [str(Path(sys.executable).with_name("py-spy")), "record", "--subprocesses", "--full-filenames",
               "--format", "raw", "-r", str(RATE), "-o", str(raw), "--",
               sys.executable, str(ROOT / "bench" / "simulate.py"), "--preset", args.preset, "--no-sync",
               "--steps", str(args.steps), "--per-proc", str(args.per_proc)]
        with sim_json.open("w") as f:
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=f)
        text = sim_json.read_text()  # py-spy's own lines ("py-spy> ...") come first
        sim, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
        run = sim["runs"][0]["async"]
        result = {"bench": "profile_sim", "label": args.label, "preset": args.preset,
                  "generators": run["generators"], "per_proc": args.per_proc,
                  "steps_profiled": run["steps"], "simulation": run,
                  "processes": summarise(raw, run["steps"])}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

"""Peak memory of real PPO iterations on CPU, measured, beside `orz plan`'s prediction (services/memplan.py).

Each row runs in a fresh process: random-init Qwen2 actor and critic of the row's shape (up to Qwen2.5-0.5B's,
494M parameters), one micro-batch of `rows` sequences of at most `width` tokens (padded, lengths varied), the
learner's own PPOTrainer: a value pass, one policy step, `critic_steps` critic steps. The first iteration
creates gradients and Adam states; the second is measured: its peak resident memory (the kernel's high-water
mark, reset before it) minus the process's memory before the models were built. glibc's mmap threshold is
fixed (MALLOC_MMAP_THRESHOLD_=65536), so freed tensors leave RSS at once and the high-water mark is the live
peak. Rows whose prediction exceeds this machine's memory are predicted only.

    python bench/learner_memory.py [--rows smallest|all|NAME,...] [--readme] [--out FILE] [--from FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import random_ppo
from readme_block import replace_block

from services.memplan import GB, QWEN25, LearnerSetting, ModelShape, learner_memory

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "20m": ModelShape("20M", 32_000, 256, 1024, 4, 4, 2),
    "110m": ModelShape("110M", 151_936, 512, 1536, 8, 8, 2, tied=True),
    "0.5b": QWEN25["qwen2.5-0.5b"],
}


@dataclass(frozen=True)
class Row:
    name: str
    shape: str
    rows: int
    width: int
    dtype: str = "float32"
    checkpointing: bool = False
    chunk_tokens: int = 2048
    critic_steps: int = 2
    packing: bool = False


ROWS = [
    Row("20m-fp32-full", "20m", 8, 256, chunk_tokens=0),
    Row("20m-fp32-chunked", "20m", 8, 256),
    Row("20m-fp32-ckpt-chunked", "20m", 8, 256, checkpointing=True),
    Row("20m-bf16-ckpt-chunked", "20m", 8, 256, dtype="bfloat16", checkpointing=True),
    Row("110m-fp32-full", "110m", 4, 1024, chunk_tokens=0),
    Row("110m-fp32-chunked", "110m", 4, 1024),
    Row("110m-fp32-ckpt-chunked", "110m", 4, 1024, checkpointing=True),
    Row("110m-fp32-ckpt-chunked-8k", "110m", 2, 4096, checkpointing=True),
    Row("110m-fp32-ckpt-chunked-packed", "110m", 4, 1024, checkpointing=True, packing=True),
    Row("110m-fp32-ckpt-chunked-1k", "110m", 2, 512, checkpointing=True, critic_steps=1),
    Row("110m-bf16-ckpt-chunked-1k", "110m", 2, 512, dtype="bfloat16", checkpointing=True, critic_steps=1),
    # Qwen2.5-0.5B's shape, 2 x 1024 tokens: the setting a CPU can run, beside the ones it cannot
    Row("0.5b-fp32-full", "0.5b", 2, 1024, chunk_tokens=0, critic_steps=1),
    Row("0.5b-fp32-chunked", "0.5b", 2, 1024, chunk_tokens=1024, critic_steps=1),
    Row("0.5b-fp32-ckpt-chunked", "0.5b", 2, 1024, checkpointing=True, chunk_tokens=1024, critic_steps=1),
    Row("0.5b-bf16-ckpt-chunked", "0.5b", 2, 1024, dtype="bfloat16", checkpointing=True, chunk_tokens=1024,
        critic_steps=1),
]
SMALLEST = "20m-fp32-ckpt-chunked"


def setting(row: Row) -> LearnerSetting:
    lengths = random_ppo.lengths(row.rows, row.width)
    slots = sum(p + r for p, r in lengths) if row.packing else row.rows * row.width
    return LearnerSetting(world=1, dtype=row.dtype, checkpointing=row.checkpointing, chunk_tokens=row.chunk_tokens,
                          microbatch_tokens=slots, width=row.width,
                          response_fraction=sum(r for _, r in lengths) / slots, padded=row.rows > 1 and not row.packing,
                          packed=row.packing)


def measure(row: Row) -> dict:
    """Runs in the child process: the models made ready as a learner rank makes them (learner/models.py)."""
    import numpy as np
    import torch

    from learner import parallel
    from learner.models import prepare
    from learner.trainer import PPOTrainer
    from services.config import LearnerConfig
    from services.memory import peak_rss_mb, reset_peak_rss, rss_mb

    torch.set_num_threads(2)
    torch.ones(64, 64) @ torch.ones(64, 64)  # the math libraries' own buffers: not the learner's
    s = SHAPES[row.shape]
    dp = parallel.init_from_env(mixed_precision=row.dtype == "bfloat16")
    gc.collect()
    base = rss_mb()
    lc = LearnerConfig(critic_steps_per_iter=row.critic_steps, max_tokens_per_microbatch=row.rows * row.width,
                       logits_chunk_tokens=row.chunk_tokens, dtype=row.dtype,
                       activation_checkpointing=row.checkpointing, packing=row.packing, warmup_steps=1,
                       step_over="batch")  # each critic step over the whole micro-batch: the model's worst case
    actor, critic = random_ppo.models(s, row.width)
    prepare(lc, dp, actor, critic)
    trainer = PPOTrainer(lc, actor, critic, None, None)
    batch = random_ppo.batch(s, random_ppo.lengths(row.rows, row.width))
    t0 = time.perf_counter()
    first = trainer.step(batch)  # gradients and Adam states exist from here on
    first_s = time.perf_counter() - t0
    gc.collect()
    steady = rss_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    stats = trainer.step(batch)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    parallel.close(dp)
    return {"measured_peak_gb": (peak - base) * 2**20 / GB, "measured_steady_gb": (steady - base) * 2**20 / GB,
            "iteration_s": round(seconds, 1), "first_iteration_s": round(first_s, 1),
            "microbatches": stats["microbatches"], "padded_fraction": round(stats["padded_fraction"], 3),
            "tokens": stats["tokens"], "policy_loss_finite": bool(np.isfinite(first["policy_loss"]))}


def run_row(row: Row, budget_gb: float) -> dict:
    st = setting(row)
    pred = learner_memory(SHAPES[row.shape], st)
    out = {"row": row.name, **asdict(row), "params": SHAPES[row.shape].params, "predicted_peak_gb": pred["peak"] / GB,
           "predicted_persistent_gb": pred["persistent"] / GB, "predicted_peak_phase": pred["peak_phase"],
           "predicted": {k: round(v / GB, 3) for k, v in pred.items() if isinstance(v, float)}}
    if pred["peak"] / GB > budget_gb:
        out["measured"] = None
        out["why_not_measured"] = f"predicted {pred['peak'] / GB:.1f} GB > {budget_gb:.1f} GB available here"
        return out
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(asdict(row))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        out["measured"] = None
        out["error"] = proc.stderr[-1500:]
        return out
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    out["measured"] = m
    out["ratio"] = round(m["measured_peak_gb"] / out["predicted_peak_gb"], 3)
    return out


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] * 1024 / GB * 0.85




def table(doc: dict) -> str:
    lines = [f"Measured {doc['date']} ({doc['machine']}); measured = peak RSS of the second PPO iteration minus the "
             "process before the models.", "",
             "| row | params | tokens (rows × width) | dtype | checkpointing | logits | predicted peak | measured peak "
             "| measured ÷ predicted | iteration |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        m = r.get("measured")
        logits = f"chunks of {r['chunk_tokens']}" if r["chunk_tokens"] else "full"
        if r.get("packing"):
            real = sum(p + q for p, q in random_ppo.lengths(r["rows"], r["width"]))
            tokens = f"{real:,} (packed: {r['rows']} × ≤ {r['width']})"
        else:
            tokens = f"{r['rows'] * r['width']:,} ({r['rows']} × {r['width']})"
        measured = (f"{m['measured_peak_gb']:.2f} GB", f"**{r['ratio']:.2f}**", f"{m['iteration_s']:.0f} s") if m else (
            "not run: " + r.get("why_not_measured", r.get("error", "failed")[:60]), "", "")
        ckpt = "yes" if r["checkpointing"] else "no"
        lines.append(f"| {r['row']} | {r['params'] / 1e6:.0f}M | {tokens} | {r['dtype']} | {ckpt} | {logits} | "
                     f"{r['predicted_peak_gb']:.2f} GB | {measured[0]} | {measured[1]} | {measured[2]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="all", help="all, smallest, or comma-separated row names")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--readme", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--from", dest="from_file", type=Path, help="render a saved result into docs/learner.md")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(Row(**json.loads(args.child)))))
        return
    if args.from_file:
        render_readme(json.loads(args.from_file.read_text()))
        return
    names = [r.name for r in ROWS] if args.rows == "all" else [SMALLEST] if args.rows == "smallest" else \
        args.rows.split(",")
    by_name = {r.name: r for r in ROWS}
    unknown = set(names) - set(by_name)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; known: {', '.join(by_name)}")
    import datetime as dt
    import platform

    results = []
    for name in names:
        print(f"row {name} …", file=sys.stderr, flush=True)
        results.append(run_row(by_name[name], _available_gb()))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    doc = {"benchmark": "learner_memory", "date": dt.date.today().isoformat(),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "rows": results,
           "max_abs_error": max((abs(r["ratio"] - 1) for r in results if r.get("ratio")), default=None)}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    if args.readme:
        render_readme(doc)
    print(json.dumps(doc, indent=1))


def render_readme(doc: dict) -> None:
    replace_block("learner-memory", table(doc))


if __name__ == "__main__":
    main()

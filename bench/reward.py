"""Reward server throughput and latency through HTTP, against the same grading in a bare process pool.

Workload: MATH500 (data/orz_eval/math500.json) — per item a correct answer written differently from the gold
where a rewrite exists (`\\dfrac`, `x = N`, decimals), and a wrong one (another item's gold), as ORZ-format
responses; `--items` of them, cycled.
- `direct`: `grade_item` (extraction, screen and math-verify comparison: exactly what the server runs per
  item) scheduled item by item on a `pebble.ProcessPool` of `--procs` workers, all at once.
- `http`: `orz reward-server --grader-procs N` (1 uvicorn worker) started as a process; `--clients` threads
  post requests of `--batch` items (a group's samples) over keep-alive connections until all are graded.
- `latency`: one client, one request of `--batch` items at a time (an unloaded server): p50/p99 per request.
- `hostile`: the `http` run again with 1% of items replaced by hostile ones (power towers, huge factorials,
  10k-deep braces, 1 MB responses, "1 1 1 …" runs, unclosed boxes, `__import__` payloads); the throughput
  on the other 99% against the clean run.
Prints JSON. Goals: http ≥ 0.8 × direct; p99 < 200 ms; hostile ≥ 0.7 × clean.

    python bench/reward.py --items 2000 --procs 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from pebble import ProcessPool

from reward_server.graders import grade_sync
from reward_server.grading import _warm_up
from services.metrics import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 5


def grade_item(task_type: str, response: str, reference: str) -> str:
    return grade_sync(task_type, response, reference, TIMEOUT_S)


def _respond(answer: str) -> str:
    return f"<think>Let me solve it.</think> <answer>The final answer is \\boxed{{{answer}}}.</answer>"


def _rewrite(gold: str) -> str:
    if "\\frac" in gold:
        return gold.replace("\\frac", "\\dfrac")
    if gold.lstrip("-").isdigit():
        return f"x = {gold}"
    return gold


def workload(n: int) -> list[dict]:
    golds = [x["final_answer"] for x in json.loads((ROOT / "data" / "orz_eval" / "math500.json").read_text())]
    items = []
    for i in range(n):
        gold = golds[(i // 2) % len(golds)]
        answer = _rewrite(gold) if i % 2 == 0 else golds[(i // 2 + 7) % len(golds)]
        items.append({"id": str(i), "response": _respond(answer), "reference": gold, "task_type": "math"})
    return items


HOSTILE = [
    _respond("9^{9^{9^9}}"), _respond("100000!"), _respond("(10^{10})!"), _respond("{" * 10_000 + "1" + "}" * 10_000),
    "blah " * 209_000 + _respond("42"), _respond("1 " * 490), "1 " * 400_000, "\\boxed{" * 100_000 + "1",
    _respond("__import__('os').system('true')"),
]


def direct(items: list[dict], procs: int) -> dict:
    _warm_up()
    with ProcessPool(max_workers=procs) as pool:
        for f in [pool.schedule(_warm_up) for _ in range(procs)]:
            f.result()
        t0 = time.perf_counter()
        futures = [pool.schedule(grade_item, args=(x["task_type"], x["response"], x["reference"]),
                                 timeout=TIMEOUT_S) for x in items]
        verdicts = [f.result() for f in futures]
        seconds = time.perf_counter() - t0
    return {"items": len(items), "seconds": round(seconds, 3), "grades_per_s": round(len(items) / seconds, 1),
            "correct": verdicts.count("correct"), "verdicts": verdicts}


class Server:
    def __init__(self, procs: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORZ__")}
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "reward-server", "--grader-procs",
                                      str(procs), "--set", f"reward.port={self.port}"], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_healthy(self.url, 60, self.proc, "the reward server")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def http(url: str, items: list[dict], batch: int, clients: int) -> dict:
    batches = [items[i:i + batch] for i in range(0, len(items), batch)]
    lock = threading.Lock()
    latencies: list[float] = []
    verdicts: dict[str, str] = {}

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                with lock:
                    if not batches:
                        return
                    body = batches.pop()
                t0 = time.perf_counter()
                resp = c.post("/v1/grade", json={"items": body})
                resp.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    verdicts.update({r["id"]: r["verdict"] for r in resp.json()["results"]})

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    latencies.sort()
    return {"items": len(items), "seconds": round(seconds, 3), "grades_per_s": round(len(items) / seconds, 1),
            "request_p50_ms": round(1000 * statistics.median(latencies), 1),
            "request_p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1),
            "verdicts": verdicts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    items = workload(args.items)
    rng = random.Random(0)
    hostile_at = set(rng.sample(range(len(items)), max(1, len(items) // 100)))
    mixed = [dict(x, response=HOSTILE[k % len(HOSTILE)], id=f"h{x['id']}") if i in hostile_at else x
             for k, (i, x) in enumerate(enumerate(items))]

    base = direct(items, args.procs)
    server = Server(args.procs)
    try:
        http(server.url, items[: args.batch * 20], args.batch, args.clients)  # warm-up
        clean = http(server.url, items, args.batch, args.clients)
        lat = http(server.url, items[: args.batch * 200], args.batch, 1)
        hostile = http(server.url, mixed, args.batch, args.clients)
    finally:
        server.close()
    agree = sum(clean["verdicts"][x["id"]] == v for x, v in zip(items, base.pop("verdicts")))
    rest = len(mixed) - len(hostile_at)
    rest_rate = rest / hostile["seconds"]
    clean_rate = len(items) / clean["seconds"]
    for run in (clean, lat, hostile):
        run.pop("verdicts")
    print(json.dumps({
        "benchmark": "reward_server", "workload": "MATH500 mixed (half correct rewrites, half wrong)",
        "grader_procs": args.procs, "batch": args.batch, "clients": args.clients,
        "direct_pool": base, "http": clean, "ratio": round(clean_rate / base["grades_per_s"], 3),
        "goal_ratio": 0.8, "latency_one_client": lat, "goal_p99_ms": 200,
        "hostile_1pct": {**hostile, "hostile_items": len(hostile_at), "other_grades_per_s": round(rest_rate, 1)},
        "hostile_ratio": round(rest_rate / clean_rate, 3), "goal_hostile_ratio": 0.7,
        "http_verdicts_equal_direct": f"{agree}/{len(items)}",
    }, indent=1))


if __name__ == "__main__":
    main()

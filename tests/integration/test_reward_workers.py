"""`orz reward-server --workers 2 --grader-procs 1` for real: two uvicorn worker processes, each with its own
grading pool, behind one port; /metrics sums what every worker graded (prometheus_client multiprocess mode)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.metrics import free_port

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        out += [int(p) for p in task.read_text().split()]
    return out


def _grades(text: str, verdict: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "orz_reward_grades_total" and s.labels == {"grader": "math", "verdict": verdict}:
                return s.value
    raise AssertionError("orz_reward_grades_total not exported")


def test_two_uvicorn_workers_share_the_port_and_the_metrics() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORZ__") and k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "reward-server", "--workers", "2",
                             "--grader-procs", "1", "--set", f"reward.port={port}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "reward server did not start"
            time.sleep(0.2)
        deadline = time.time() + 60
        while True:  # both uvicorn workers up, each with its grading process (the first answers /healthz earlier)
            workers = _children(proc.pid)  # uvicorn's worker processes (its supervisor may add a resource tracker)
            if len(workers) >= 2 and sum(len(_children(w)) >= 1 for w in workers) >= 2:
                break
            assert time.time() < deadline, f"workers {workers} did not all start their grading pools"
            time.sleep(0.2)
        pids = set()
        sent = 0
        while len(pids) < 2 and sent < 200:  # a fresh connection per request: the kernel spreads them over workers
            with httpx.Client(base_url=url, timeout=10) as c:
                resp = c.post("/v1/grade", json={"items": [
                    {"id": f"{sent}/0", "response": "<answer>\\boxed{\\frac{1}{2}}</answer>", "reference": "0.5"},
                    {"id": f"{sent}/1", "response": "<answer>\\boxed{3}</answer>", "reference": "0.5"}]})
                assert [r["verdict"] for r in resp.json()["results"]] == ["correct", "wrong"]
                sent += 1
                pids.add(c.get("/healthz").json().get("pid"))
        assert len(pids) == 2, pids  # both workers answered
        text = httpx.get(f"{url}/metrics", timeout=5).text
        assert _grades(text, "correct") == sent and _grades(text, "wrong") == sent  # summed over both workers
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise

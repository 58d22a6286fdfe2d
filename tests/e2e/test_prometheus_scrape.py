"""A real Prometheus (Debian's package) scraping a real `orz up` run on loopback.

Checks through Prometheus' HTTP API that the learner's step advances and the reward server's grade counter
is above zero; and checks every metric name the Grafana dashboard and the alert rules use against live
/metrics scrapes of the learner, a generator and the reward server (so no panel or alert refers to a
metric the code does not export).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from services.metrics import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _used_metric_names() -> set[str]:
    exprs = [t["expr"] for p in json.loads((DEPLOY / "grafana" / "dashboards" / "orz-async.json").read_text())["panels"]
             for t in p["targets"]]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "orz.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return {m for e in exprs for m in re.findall(r"\b(orz_[a-z0-9_]+)", e)}


def _sample_names(url: str) -> set[str]:
    text = httpx.get(url, timeout=5).text
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def _run_processes(run_name: str) -> list[int]:
    """Live processes started for the run (their environment names it), zombies left out."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and f"ORZ__RUN_NAME={run_name}".encode() in (d / "environ").read_bytes().split(b"\0") \
                    and (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _query(prom: str, expr: str) -> float | None:
    data = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert data["status"] == "success", data
    result = data["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def _wait(what: str, check, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, f"orz up exited ({proc.returncode}) while waiting for {what}"
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_prometheus_scrapes_a_live_run(tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus is not None, "prometheus is required (Debian's package; .ci/run installs it)"
    learner_port, generator_port, prom_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORZ__")}
    cmd = [sys.executable, "-m", "services.cli", "up", "--config", str(ROOT / "configs" / "tiny.yaml"), "--skip-eval",
           "--set", f"run_dir={tmp_path / 'runs'}", "--set", "run_name=scrape", "--set", "learner.total_steps=200",
           "--set", "generator.num=1", "--set", f"generator.metrics_port={generator_port}",
           "--set", f"learner.metrics_port={learner_port}"]
    run = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(run.stdout.readline, "")), daemon=True).start()  # type: ignore
    prom_proc = None
    try:
        reward_url: list[str] = []

        def reward_known() -> bool:
            for log in (tmp_path / "runs" / "scrape" / "logs").glob("*.log"):
                m = re.search(r"listening on (http://[\d.]+:\d+)", log.read_text(errors="replace"))
                if m:
                    reward_url.append(m.group(1))
                    return True
            return False

        _wait("the reward server's address", reward_known, 300, run)
        learner, generator = f"127.0.0.1:{learner_port}", f"127.0.0.1:{generator_port}"
        reward = reward_url[0].removeprefix("http://")
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(DEPLOY / "prometheus" / "rules" / "orz.yml")],
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                                     for job, target in (("orz-learner", learner), ("orz-generator", generator),
                                                         ("orz-reward-server", reward))]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom_proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{prom_port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        prom = f"http://127.0.0.1:{prom_port}"

        def prometheus_ready() -> bool:
            assert prom_proc is not None and prom_proc.poll() is None, "prometheus exited"
            try:
                return httpx.get(f"{prom}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait("Prometheus to be ready", prometheus_ready, 60, run)

        def step_at_least(n: int):
            return lambda: (_query(prom, "max(orz_learner_step)") or 0) >= n

        _wait("Prometheus to see learner step 2", step_at_least(2), 600, run)
        first = _query(prom, "max(orz_learner_step)")
        assert first is not None
        _wait("the step to advance in Prometheus", step_at_least(first + 2), 300, run)
        assert (_query(prom, "sum(orz_reward_grades_total)") or 0) > 0
        up = httpx.get(f"{prom}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        assert sorted(t["health"] for t in up) == ["up", "up", "up"], up
        rules = httpx.get(f"{prom}/api/v1/rules", timeout=5).json()["data"]["groups"]
        assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules  # every rule evaluates

        exported = set()
        for target in (learner, generator, reward):
            exported |= _sample_names(f"http://{target}/metrics")
        used = _used_metric_names()
        assert len(used) >= 20
        missing = {m for m in used if m not in exported}
        assert not missing, f"dashboard/rules use metrics no process exports: {sorted(missing)}"

        # Stopping: SIGTERM, then a second signal while orz up stops its children (an impatient Ctrl-C). The
        # second must not cut the stopping short: no process of the run outlives orz up.
        run.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        run.send_signal(signal.SIGINT)
        run.wait(120)
        assert _run_processes("scrape") == [], "children outlived orz up"
    finally:
        if prom_proc is not None:
            prom_proc.terminate()
            prom_proc.wait(30)
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGINT)
            try:
                run.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)

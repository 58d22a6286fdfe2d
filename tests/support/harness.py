"""The tiny stack as separate OS processes, for fault injection: a real redis-server with AOF (`everysec`, in
a directory that survives a restart), one or more real reward servers, the learner and vLLM generators with
fixed ids, each its own process with its own log. Tests kill, stop, restart and poison parts of it and then
check the accounting with `check_accounting`.

With `net` (tests/support/netsim.py) every part runs on a host of its own, a network namespace: Redis,
the reward server, the learner and each generator bind and dial by their hosts' addresses, so nothing can
lean on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from services.config import Config
from services.config_io import config_to_env, load_config
from services.control import Keys
from services.dead_letter import dead_letters
from services.metrics import free_port
from services.redis_client import connect
from services.redis_server import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[2]


class Proc:
    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path,
                 prefix: list[str] | None = None) -> None:
        self.name, self.args, self.env, self.logs, self.prefix = name, args, env, logs, prefix or []
        self.log = logs / f"{name}.log"
        self.expected_exit = False  # killed on purpose
        self._start()

    def _start(self) -> None:
        self._f = self.log.open("ab")
        self.p = subprocess.Popen([*self.prefix, sys.executable, "-m", "services.cli", *self.args], cwd=ROOT,
                                  env=self.env,
                                  stdout=self._f, stderr=subprocess.STDOUT, start_new_session=True)
        self.expected_exit = False

    def restart(self) -> None:
        assert self.p.poll() is not None, f"{self.name} is still running"
        self._f.close()
        self._start()

    @property
    def alive(self) -> bool:
        return self.p.poll() is None

    def signal(self, sig: int) -> None:
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.expected_exit = True
        self.p.send_signal(sig)
        if sig == signal.SIGKILL:
            self.p.wait(10)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.expected_exit = True
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGCONT)
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self._f.close()


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Stack:
    def __init__(self, tmp: Path, name: str, *, steps: int, batch: int = 4, generators: int = 2,
                 reward_replicas: int = 1, overrides: dict[str, Any] | None = None, net=None) -> None:
        self.tmp = tmp
        self.net = net
        self.hosts: dict[str, Any] = {}
        if net is not None:  # one host each; the first generator's link can be impaired (delay, loss)
            for host in ("redis", "reward", "learner"):
                self.hosts[host] = net.add(host)
            for i in range(generators):
                self.hosts[f"gen-{i}"] = net.add(f"gen-{i}", impairable=(i == 0))
            assert reward_replicas == 1, "one reward host"
        redis_host = self.hosts["redis"].addr if net is not None else "127.0.0.1"
        reward_host = self.hosts["reward"].addr if net is not None else "127.0.0.1"
        # Off loopback Redis refuses clients without a password (protected mode), as a deployment's does.
        self.redis_password = "orz-multihost" if net is not None else None
        self.redis = EmbeddedRedis(port=6379 if net is not None else free_port(), workdir=str(tmp / "redis"),
                                   appendonly=True, host=redis_host,
                                   launcher=self.hosts["redis"].prefix if net is not None else (),
                                   extra_args=("--requirepass", self.redis_password) if net is not None else ())
        self.reward_ports = [8600] if net is not None else [free_port() for _ in range(reward_replicas)]
        settings = {
            "run_dir": str(tmp / "runs"), "run_name": name,
            "redis": {"url": self.redis.url, "claim_idle_ms": 3000, "reclaim_every_s": 1.0, "retry_s": 60,
                      "password": self.redis_password},
            "reward": {"url": ",".join(f"http://{reward_host}:{p}" for p in self.reward_ports), "host": reward_host,
                       "port": self.reward_ports[0], "request_timeout_s": 5.0, "retry_s": 120},
            "learner": {"total_steps": steps, "batch_prompts": batch, "n_samples": 4, "wait_timeout_s": 300},
            "generator": {"heartbeat_s": 1.0},
            "weight_sync": {"timeout_s": 10, **({"host": self.hosts["learner"].addr} if net is not None else {})},
        }
        self.cfg: Config = load_config(ROOT / "configs" / "tiny.yaml", environ={},
                                       overrides=_merge(settings, overrides or {}))
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("ORZ__")}, **config_to_env(self.cfg)}
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.run = self.cfg.run_path
        self.keys = Keys(self.cfg.namespace)
        self.n_generators = generators
        self.procs: list[Proc] = []
        self.rewards: list[Proc] = []
        self.generators: list[Proc] = []
        self.learner: Proc | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> Stack:
        self.redis.start()
        for i, port in enumerate(self.reward_ports):
            self.rewards.append(self._spawn(f"reward-{i}", ["reward-server", "--set", f"reward.port={port}"],
                                            "reward"))
        for url in self.cfg.reward.url.split(","):
            self.wait(f"reward server {url}", lambda u=url: _ok(f"{u}/healthz"), 120)
        self.learner = self._spawn("learner", ["learner"], "learner")
        client = self.client()
        self.wait("the learner to reset the streams", lambda: client.exists(self.keys.policy_version) == 1, 300)
        for i in range(self.n_generators):
            self.generators.append(self._spawn(f"gen-{i}", ["generator", "--id", f"gen-{i}"], f"gen-{i}"))
        return self

    def _spawn(self, name: str, args: list[str], host: str | None = None) -> Proc:
        """A process; on its own host (namespace) when the stack has a network: its metrics bind its address."""
        prefix = None
        if self.net is not None and host is not None:
            h = self.hosts[host]
            prefix = h.prefix
            section = "generator" if host.startswith("gen-") else host
            if section in ("learner", "generator"):
                args = [*args, "--set", f"{section}.metrics_host={h.addr}"]
        proc = Proc(name, args, self.env, self.logs, prefix)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for p in sorted(reversed(self.procs), key=lambda p: p.name != "learner"):
            p.stop()
        self.redis.stop()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close()
        if exc_type is not None:  # pytest shows captured stdout of a failed test: the last lines of every log
            for p in self.procs:
                tail = p.text().splitlines()[-25:]
                print(f"--- last {len(tail)} lines of {p.log}", *tail, sep="\n")

    # --- observing ---------------------------------------------------------------------------------------
    def client(self):
        return connect(self.redis.url, socket_timeout_s=10.0, password=self.redis_password)

    def records(self) -> list[dict]:
        path = self.run / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    def check_alive(self, what: str = "") -> None:
        """Fails if a process has exited that nobody killed."""
        for p in self.procs:
            if not p.alive and not p.expected_exit:
                raise AssertionError(f"{p.name} exited ({p.p.returncode}) {what}:\n{p.text()[-4000:]}")

    def wait(self, what: str, check: Callable[[], bool], timeout_s: float) -> float:
        """Polls `check` until true; fails if it never is or a process dies that nobody killed. Returns the
        seconds waited."""
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            if check():
                return time.time() - t0
            self.check_alive(f"waiting for {what}")
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def wait_steps(self, n: int, timeout_s: float = 300) -> float:
        return self.wait(f"step {n}", lambda: len(self.records()) >= n, timeout_s)

    def finish(self, timeout_s: float = 600) -> None:
        self.wait("the run to finish", lambda: (self.run / "DONE").exists(), timeout_s)
        assert self.learner is not None
        assert self.learner.p.wait(120) == 0, self.learner.text()[-4000:]

    def stop_learner(self, timeout_s: float = 120) -> None:
        """Stops a run that has no natural end (`steps` larger than it will ever reach) the way an operator does:
        SIGTERM to the learner, which writes STOPPED with its accounting (`check_accounting(final="STOPPED")`)."""
        assert self.learner is not None
        self.learner.signal(signal.SIGTERM)
        assert self.learner.p.wait(timeout_s) == 0, self.learner.text()[-4000:]

    def dead_letters(self) -> list:
        return dead_letters(self.client(), self.keys.dead, count=10_000)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def check_accounting(stack: Stack, final: str = "DONE") -> dict[str, int]:
    """The invariant every fault test asserts: every task id the feeder fed is trained exactly once, dropped as
    stale (and counted), filtered (learner.filter_groups, counted), or still in flight at the end and findable
    in Redis; none is lost, none trained twice.
    `final`: DONE (the run finished) or STOPPED (the learner was stopped early). Returns the counts."""
    run = stack.run
    ledger = [json.loads(x) for x in (run / "tasks.jsonl").read_text().splitlines()]
    fed = [e["task_id"] for e in ledger if e["event"] == "fed"]
    refed = [e["task_id"] for e in ledger if e["event"] == "refed"]
    trained = [e["task_id"] for e in ledger if e["event"] == "trained"]
    dropped = [e["task_id"] for e in ledger if e["event"] == "dropped_stale"]
    filtered = [e["task_id"] for e in ledger if e["event"] == "filtered"]
    done = json.loads((run / final).read_text())
    inflight = set(done["inflight"])

    assert len(fed) == len(set(fed)), "a task id was fed twice as new"
    assert set(refed) <= set(fed), "a task was fed again that was never fed"
    assert len(trained) == len(set(trained)), "a task was trained twice"
    assert len(dropped) == len(set(dropped)) and not set(dropped) & set(trained)
    assert len(filtered) == len(set(filtered)) and not set(filtered) & (set(trained) | set(dropped))
    assert not inflight & (set(trained) | set(dropped) | set(filtered))
    assert set(fed) == set(trained) | set(dropped) | set(filtered) | inflight, \
        "a fed task is neither trained, dropped, filtered nor in flight"
    assert done["unaccounted"] == [], f"in flight but in neither stream: {done['unaccounted']}"
    assert len(inflight) <= stack.cfg.max_inflight_prompts

    records = stack.records()
    cfg = stack.cfg.learner
    steps = cfg.total_steps if final == "DONE" else done["steps"]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert [t for r in records for t in r["task_ids"]] == trained  # what was trained is what the ledger says
    assert records[-1]["dropped_stale_total"] == len(dropped)  # every drop counted
    assert records[-1].get("filtered_groups_total", 0) == len(filtered)  # every filtered group counted
    # Every batch full, unless filtering ran into learner.max_oversample (the step says so in its record).
    assert all(len(r["task_ids"]) == cfg.batch_prompts or r.get("filtered_groups", 0) >= (
        cfg.max_oversample or 4 * cfg.batch_prompts) for r in records)
    return {"fed": len(fed), "refed": len(refed), "trained": len(trained), "dropped_stale": len(dropped),
            **({"filtered": len(filtered)} if filtered else {}),
            "inflight": len(inflight), "duplicates": done["duplicates"], "learner_dead_lettered": done["dead_lettered"]}


def step_times(stack: Stack) -> list[float]:
    """Wall-clock time at which each step finished."""
    return [r["time"] for r in stack.records()]


def recovery_s(stack: Stack, fault_at: float, steps: int = 1, timeout_s: float = 180) -> float:
    """Seconds from `fault_at` until `steps` more learner steps had finished (waiting for them, at most
    `timeout_s`: failing if they never come)."""
    stack.wait(f"{steps} step(s) after the fault",
               lambda: sum(t > fault_at for t in step_times(stack)) >= steps, timeout_s)
    after = [t for t in step_times(stack) if t > fault_at]
    return round(after[steps - 1] - fault_at, 2)


def write_report(name: str, report: dict) -> None:
    """Appends a fault test's measurements to $ORZ_FAULT_REPORT (a JSON-lines file) when set: the table
    of docs/failure-modes.md is built from these."""
    path = os.environ.get("ORZ_FAULT_REPORT")
    print(f"fault report {name}: {json.dumps(report)}")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"fault": name, **report}) + "\n")

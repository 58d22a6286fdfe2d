"""`orz up`: the whole system on one machine, each part its own OS process.

Order: base model (built if missing) → Redis (embedded unless `redis.url` is set; AOF under
`runs/<run>/redis/`) → reward server → learner (waits until it has reset the run's streams) → generators →
progress until the learner finishes → generators stopped → evaluation of the base and the trained model →
everything stopped. Children run in their own sessions with logs under `runs/<run>/logs/`; Ctrl-C (or
SIGTERM) stops all of them, newest first. A child that dies meanwhile is restarted (services/supervise.py,
`stack.restart`); the learner is restarted with `--auto-resume`, from its newest checkpoint.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.config import Config
from services.config_io import config_to_env
from services.control import Keys
from services.metrics import free_port, window_means, window_steps
from services.redis_client import connect_cfg
from services.redis_server import EmbeddedRedis
from services.supervise import Child, RedisChild, StackError, Supervisor

console = Console(soft_wrap=True)  # one line per message off a TTY too (no wrap at 80 columns)


def _wait(what: str, check, timeout_s: float, children: list[Child]) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for child in children:
            if not child.alive():
                raise StackError(f"{child.name} exited with code {child.proc.returncode} while waiting for {what}:\n"
                                 f"{child.tail()}")
        if check():
            return
        time.sleep(0.3)
    raise StackError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _follow(metrics_path: Path, offset: int) -> tuple[list[dict], int]:
    if not metrics_path.exists():
        return [], offset
    with metrics_path.open() as f:
        f.seek(offset)
        chunk = f.read()
    complete = chunk[: chunk.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()], offset + len(complete)


def up(cfg: Config, evaluate: bool = True, resume: bool = False) -> int:
    t_start = time.time()
    run_path = cfg.run_path
    log_dir = run_path / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    children: list[Child] = []
    redis_server: EmbeddedRedis | None = None

    stopping = False

    def on_signal(signum, _frame) -> None:
        # Once: a second signal (Ctrl-C twice, SIGTERM then SIGINT) must not cut short the stopping of the
        # children below, or they outlive `orz up`.
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    # Installed explicitly: a process started from a non-interactive shell inherits SIGINT as ignored.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    env = dict(os.environ)
    try:
        # A model built by `orz make-base-model` is (re)built when missing or made from another recipe; a
        # user's own HF directory (no base_model.json) is used as it is.
        built_here = (cfg.model.path / "base_model.json").exists()
        if built_here or not (cfg.model.path / "config.json").exists():
            console.print(f"[bold]base model[/] at {cfg.model.path} (built once, then cached)")
            subprocess.run([sys.executable, "-m", "services.cli", "make-base-model"], env={**env, **config_to_env(cfg)},
                           check=True)
        if cfg.redis.url is None:
            # Durable for this `orz up` only: a restart after a crash reloads the AOF; a new `orz up` starts empty.
            shutil.rmtree(run_path / "redis", ignore_errors=True)
            redis_server = EmbeddedRedis(workdir=str(run_path / "redis"), appendonly=True).start()
            cfg.redis.url = redis_server.url
        own_reward_server = cfg.reward.url is None
        if own_reward_server:
            cfg.reward.port = free_port(cfg.reward.host)
            cfg.reward.url = f"http://{cfg.reward.host}:{cfg.reward.port}"
        env.update(config_to_env(cfg))
        resumed = " (resumed)" if resume else ""
        console.print(f"run [bold]{cfg.run_name}[/]{resumed}: redis {cfg.redis.url}, reward server {cfg.reward.url}, "
                      f"{cfg.generator.num} generators, {cfg.learner.total_steps} steps; logs in {log_dir}")

        if own_reward_server:
            children.append(Child("reward_server", ["reward-server"], env, log_dir))
        _wait("the reward server", lambda: _healthy(f"{cfg.reward.url}/healthz"), 120, children)

        redis = connect_cfg(cfg.redis)
        keys = Keys(cfg.namespace)
        launcher = None
        if cfg.learner.num_processes > 1:  # data parallel: torchrun starts the ranks (learner/parallel.py)
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={cfg.learner.num_processes}"]
        learner = Child("learner", ["learner", *(["--resume"] if resume else [])], env, log_dir, launcher)
        children.append(learner)
        _wait("the learner to reset the run's streams", lambda: redis.exists(keys.policy_version) == 1, 300,
              children)
        for i in range(cfg.generator.num):  # stable ids: a restarted generator takes its old place
            children.append(Child(f"generator-{i}", ["generator", "--id", f"generator-{i}"], env, log_dir))
        supervisor = Supervisor(cfg.stack, lambda msg: console.print(f"[yellow]{msg}[/]"))
        redis_child = RedisChild(redis_server) if redis_server is not None else None

        metrics_path = run_path / "metrics.jsonl"
        offset = 0
        history: list[dict] = []
        with Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("reward {task.fields[reward]}"), TimeElapsedColumn(), console=console) as progress:
            bar = progress.add_task("train", total=cfg.learner.total_steps, reward="-")
            printed = 0
            resumed_at: float | None = None  # a restarted learner cuts metrics.jsonl back to its checkpoint
            while learner.returncode != 0:
                if redis_child is not None:
                    supervisor.poll(redis_child)
                for child in children:
                    if child is not learner:
                        supervisor.poll(child)
                if not learner.alive():
                    before = supervisor.restarts.get("learner", 0)
                    supervisor.poll(learner, lambda: learner.restart(["learner", "--auto-resume"]),
                                    give_up=lambda msg: msg + "\n" + _resume_hint())
                    if supervisor.restarts.get("learner", 0) > before:
                        resumed_at = time.time()
                if resumed_at is not None:
                    # Until its first new step the file may still be cut back: read it whole each time.
                    history, offset = [], 0
                records, offset = _follow(metrics_path, offset)
                if resumed_at is not None and any(r["time"] > resumed_at for r in records):
                    resumed_at = None
                for r in records:
                    history.append(r)
                    if r["step"] <= printed:
                        continue
                    printed = r["step"]
                    progress.console.print(
                        f"step {r['step']:>4}  v{r['policy_version']:<4} reward {r['reward_mean']:.3f}  "
                        f"len {r['response_len_mean']:5.1f}  staleness {r['staleness_mean']:.2f}  "
                        f"dropped {r['dropped_stale']}  step {r['step_time_s']:.2f}s")
                    progress.update(bar, completed=r["step"], reward=f"{r['reward_mean']:.3f}")
                time.sleep(0.5)
            records, offset = _follow(metrics_path, offset)
            history.extend(records)
        t_trained = time.time()
        for child in children:
            if child.name.startswith("generator"):
                child.stop()
        summary = _summary(history, t_trained - t_start)
        summary["restarts"] = dict(supervisor.restarts)
        summary["accounting"] = _accounting(run_path / "tasks.jsonl")
        if evaluate:
            final = run_path / "checkpoints" / "final"
            ev = Child("eval", ["eval", "--model", str(cfg.model.path), "--model", str(final),
                                "--out", str(run_path / "eval.json")], env, log_dir)
            children.append(ev)
            ev.proc.wait()
            if ev.proc.returncode != 0:
                raise StackError(f"evaluation failed:\n{ev.tail()}")
            results = json.loads((run_path / "eval.json").read_text())
            summary["base_accuracy"] = results[str(cfg.model.path)]["accuracy"]
            summary["trained_accuracy"] = results[str(final)]["accuracy"]
        summary["wall_s"] = round(time.time() - t_start, 1)
        (run_path / "summary.json").write_text(json.dumps(summary, indent=2))
        _print_summary(summary, run_path)
        _print_trackers(cfg, run_path)
        return 0
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping every process[/]")
        return 130
    except StackError as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    finally:
        stopping = True  # from here a signal is ignored: the children are being stopped
        # The learner first: it finishes its step and closes the weight-sync group, so generators are not
        # torn out of a broadcast; then the rest, newest first.
        for child in sorted(reversed(children), key=lambda c: c.name != "learner"):
            child.stop()
        if redis_server is not None:
            redis_server.stop()


def _resume_hint() -> str:
    """The command that resumes this run: the one that started it, with --resume."""
    args = sys.argv[1:] if sys.argv[1:2] == ["up"] else ["up", *sys.argv[1:]]
    if "--resume" not in args:
        args = [args[0], "--resume", *args[1:]]
    return f"The run can be resumed from its newest checkpoint: {shlex.join(['orz', *args])}"


def _accounting(ledger: Path) -> dict:
    """From the ledger: tasks fed, trained (and how many of them twice: must be 0), dropped as stale, filtered
    (learner.filter_groups), and fed but none of those when the run ended (in flight)."""
    fed: set[str] = set()
    trained: list[str] = []
    dropped: set[str] = set()
    filtered: set[str] = set()
    if ledger.is_file():
        for line in ledger.read_text().splitlines():
            e = json.loads(line)
            if e["event"] == "fed":
                fed.add(e["task_id"])
            elif e["event"] == "trained":
                trained.append(e["task_id"])
            elif e["event"] == "dropped_stale":
                dropped.add(e["task_id"])
            elif e["event"] == "filtered":
                filtered.add(e["task_id"])
    done = set(trained) | dropped | filtered
    return {"fed": len(fed), "trained": len(trained), "trained_twice": len(trained) - len(set(trained)),
            "dropped_stale": len(dropped), "filtered": len(filtered), "in_flight_at_end": len(fed - done),
            "trained_not_fed": len(done - fed)}


def _summary(history: list[dict], train_wall_s: float) -> dict:
    if not history:
        return {"steps": 0}
    tokens = sum(r["response_len_mean"] * len(r["task_ids"]) for r in history)
    reward_first, reward_last = window_means(history, "reward_mean")
    len_first, len_last = window_means(history, "response_len_mean")
    return {
        "steps": len(history),
        "window_steps": window_steps(len(history)),
        "reward_first_steps": reward_first, "reward_last_steps": reward_last,
        "response_len_first_steps": len_first, "response_len_last_steps": len_last,
        "learner_step_s_mean": sum(r["step_time_s"] for r in history) / len(history),
        "learner_train_s_mean": sum(r["train_s"] for r in history) / len(history),
        "train_phase_s": round(train_wall_s, 1),
        "dropped_stale_total": history[-1]["dropped_stale_total"],
        "staleness_mean": sum(r["staleness_mean"] for r in history) / len(history),
        "trained_groups": sum(len(r["task_ids"]) for r in history),
        "trained_response_tokens": tokens,
    }


def _print_trackers(cfg: Config, run_path: Path) -> None:
    """Where the experiment trackers wrote, as the commands that open them (docs/tracking.md)."""
    lc = cfg.logging
    if "tensorboard" in lc.sinks:
        console.print(f"tensorboard --logdir {lc.tensorboard_dir or run_path / 'tensorboard'}")
    if "wandb" in lc.sinks and lc.wandb_mode == "offline":
        console.print(f"wandb sync {run_path / 'wandb'}/offline-run-*")
    if "mlflow" in lc.sinks and lc.mlflow_tracking_uri is None:
        console.print(f"mlflow ui --backend-store-uri sqlite:///{(run_path / 'mlflow.db').resolve()}")


def _print_summary(s: dict, run_path: Path) -> None:
    console.print(f"[bold green]done[/] in {s['wall_s']:.0f} s — {s.get('steps', 0)} steps")
    if s.get("steps"):
        k = s["window_steps"]
        console.print(f"first {k} → last {k} steps: train reward {s['reward_first_steps']:.3f} → "
                      f"{s['reward_last_steps']:.3f}; mean response length {s['response_len_first_steps']:.1f} → "
                      f"{s['response_len_last_steps']:.1f} tokens")
    if s.get("restarts"):
        console.print("restarts: " + ", ".join(f"{name} {n}" for name, n in sorted(s["restarts"].items())))
    if "accounting" in s:
        a = s["accounting"]
        console.print(f"tasks: {a['fed']} fed, {a['trained']} trained ({a['trained_twice']} twice), "
                      f"{a['dropped_stale']} dropped as stale, "
                      + (f"{a['filtered']} filtered, " if a.get("filtered") else "")
                      + f"{a['in_flight_at_end']} in flight at the end")
    if "base_accuracy" in s:
        console.print(f"held-out accuracy: base model [bold]{s['base_accuracy']:.3f}[/] → "
                      f"trained [bold]{s['trained_accuracy']:.3f}[/]")
    console.print(f"metrics {run_path / 'metrics.jsonl'}, plot {run_path / 'curves.png'}, "
                  f"checkpoint {run_path / 'checkpoints' / 'final'}")

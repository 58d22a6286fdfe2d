"""The `orz` command line: one entry point for every process.

`services/` imports none of the process packages at module level; each command imports its own process's
entry point when it runs, so `orz reward-server` never loads torch models and `orz learner` never loads vLLM.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import typer
import yaml

from services.config import Config
from services.config_io import load_config, require_model
from services.logfmt import configure as configure_logging

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="orz-async: asynchronous PPO-GAE training of reasoning LLMs (ORZ recipe).")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (see configs/)")
SetOpt = typer.Option(None, "--set", "-s", help="override a key: --set learner.total_steps=5 (repeatable)")


def _overrides(pairs: list[str] | None) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise typer.BadParameter(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return tree


def _setup(config: Path | None, sets: list[str] | None, process: str, needs_model: bool = False) -> Config:
    configure_logging(process)
    try:
        cfg = load_config(config, overrides=_overrides(sets))
        configure_logging(process, cfg.logging.format)
        if cfg.weight_sync.socket_ifname:
            for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                os.environ.setdefault(var, cfg.weight_sync.socket_ifname)
        if needs_model:
            require_model(cfg)
        return cfg
    except (OSError, ValueError) as exc:
        typer.secho(f"config error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None


def _entry(module: str, func: str = "run"):
    return getattr(importlib.import_module(module), func)


@app.command()
def up(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt,
       skip_eval: bool = typer.Option(False, help="do not evaluate base and trained models at the end"),
       resume: bool = typer.Option(False, help="continue the run from its newest complete checkpoint")) -> None:
    """Run the whole stack locally: Redis, reward server, generators, learner; then evaluate."""
    cfg = _setup(config, set_, "up")
    from services.plan import warn_if_it_will_not_fit
    from services.stack import up as stack_up

    warn_if_it_will_not_fit(cfg, logging.getLogger("orz.plan"))

    raise typer.Exit(stack_up(cfg, evaluate=not skip_eval, resume=resume))


@app.command()
def learner(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt,
            resume: bool = typer.Option(False, help="continue from the newest complete checkpoint"),
            auto_resume: bool = typer.Option(
                False, help="continue from the newest checkpoint if there is one, else start fresh (for "
                "restarted pods)")) -> None:
    """Run the learner (feeder + PPO + weight broadcast); under torchrun, one data-parallel rank of it."""
    _entry("learner.main")(_setup(config, set_, "learner", needs_model=True), "auto" if auto_resume else resume)


@app.command("config")
def config_(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt,
            get: str | None = typer.Option(None, help="print one value instead: a dotted key (redis.url) or "
                                           "run_path (<run_dir>/<run_name>); for scripts such as deploy/slurm/")
            ) -> None:
    """Print the resolved config as YAML: defaults, file, ORZ__ environment and --set merged (exit 2 on bad keys
    or values, naming every one)."""
    cfg = _setup(config, set_, "config")
    if get is None:
        typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, width=1 << 20), nl=False)
        return
    if get == "run_path":
        typer.echo(str(cfg.run_path))
        return
    value: Any = cfg.model_dump(mode="json")
    for part in get.split("."):
        if not isinstance(value, dict) or part not in value:
            typer.secho(f"config error: no key {get!r}", fg="red", err=True)
            raise typer.Exit(2)
        value = value[part]
    typer.echo(value if isinstance(value, str) else json.dumps(value))


@app.command()
def plan(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt,
         gpu: str = typer.Option("h100-80gb", help="h100-80gb, h200-141gb or a100-80gb"),
         json_: bool = typer.Option(False, "--json", help="print the plan as JSON (keys: docs/learner.md)"),
         model_shape: str | None = typer.Option(
             None, help="the model's shape when model.base_path is not on this machine: qwen2.5-0.5b … qwen2.5-32b"),
         response_median: float | None = typer.Option(
             None, help="median response tokens assumed for the step time (default min(1000, max_tokens / 2))"),
         prompt_tokens: int = typer.Option(200, help="mean prompt tokens assumed for the step time")) -> None:
    """Predict per-rank learner memory, generator KV capacity, whether each fits the GPU, and the step time."""
    cfg = _setup(config, set_, "plan")
    import json

    from services.plan import plan as make_plan
    from services.plan import render

    try:
        result = make_plan(cfg, gpu, model_shape, response_median, prompt_tokens)
    except ValueError as exc:
        typer.secho(f"plan error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result, indent=1) if json_ else render(result))


@app.command()
def health(url: str = typer.Option(
        None, envvar="ORZ_HEALTH_URL", help="the /healthz URL to check (default http://127.0.0.1:8600/healthz)"),
        timeout_s: float = typer.Option(3.0, help="seconds to wait for the answer")) -> None:
    """Exit 0 when a process answers its /healthz with 200 (container health checks)."""
    import httpx

    target = url or "http://127.0.0.1:8600/healthz"
    try:
        resp = httpx.get(target, timeout=timeout_s)
    except httpx.HTTPError as exc:
        typer.secho(f"unhealthy: {target}: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    if resp.status_code != 200:
        typer.secho(f"unhealthy: {target} answered {resp.status_code}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(resp.text)


@app.command()
def generator(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt,
              id_: str | None = typer.Option(
                  None, "--id", envvar="ORZ_GENERATOR_ID",
                  help="generator id (default gen-<host>-<pid>); a restarted generator that keeps its id (a pod "
                  "name) takes its old place in the weight-sync group")) -> None:
    """Run one generator (vLLM engine pulling prompts from Redis)."""
    _entry("generator.worker")(_setup(config, set_, "generator", needs_model=True), id_)


@app.command("reward-server")
def reward_server(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt,
                  host: str | None = typer.Option(None, help="bind address (reward.host; 0.0.0.0 in containers)"),
                  port: int | None = typer.Option(None, min=1, max=65535, help="port (reward.port)"),
                  workers: int | None = typer.Option(None, min=1, help="uvicorn worker processes (reward.workers)"),
                  grader_procs: int | None = typer.Option(
                      None, min=1, help="grading processes per uvicorn worker (reward.grader_procs)")) -> None:
    """Run the reward server (FastAPI + uvicorn)."""
    flags = {"host": host, "port": port, "workers": workers, "grader_procs": grader_procs}
    extra = [f"reward.{key}={value}" for key, value in flags.items() if value is not None]
    _entry("reward_server.app", "serve")(_setup(config, [*(set_ or []), *extra], "reward"))


@app.command("make-base-model")
def make_base_model(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt,
                    force: bool = typer.Option(False, help="rebuild even if cached"),
                    out: Path | None = typer.Option(None, help="output directory (default model.base_path)")) -> None:
    """Build the tiny base model (tokenizer + Qwen2 + brief pretraining), with no download."""
    cfg = _setup(config, set_, "base-model")
    import torch

    torch.set_num_threads(2)
    path = _entry("learner.base_model", "build_base_model")(cfg, out, force)
    typer.echo(str(path))


@app.command()
def plot(runs: list[Path] = typer.Argument(..., help="run directories (each with metrics.jsonl)"),
         out: Path = typer.Option(Path("compare.png"), "--out", "-o", help="PNG to write")) -> None:
    """Plot several runs' training curves on shared axes (e.g. PPO-GAE against GRPO)."""
    import json

    from learner.plot import plot_comparison

    histories = {}
    for run in runs:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        history = [json.loads(x) for x in lines if x.strip()]
        label = history[0].get("advantage", run.name) if history else run.name
        histories[f"{run.name} ({label})"] = history
    plot_comparison(histories, out)
    typer.echo(f"wrote {out}")


@app.command("eval")
def eval_(model: list[Path] | None = typer.Option(None, "--model", "-m", help="HF model directory (repeatable)"),
          config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt,
          bench: str | None = typer.Option(
              None, help="comma-separated benchmarks from data/: math500, aime2024, gpqa_diamond, gsm8k, amc23 "
              "(default: the toy task's held-out problems)"),
          n: int = typer.Option(4, help="--bench: samples per problem (ORZ: 16)"),
          k: str = typer.Option("1", help="--bench: comma-separated k for pass@k (k <= n)"),
          limit: int | None = typer.Option(None, help="--bench: the first N problems of each benchmark"),
          template: str = typer.Option("orz_base", help="--bench: prompt template (templates/ name or a path)"),
          oracle: bool = typer.Option(False, help="--bench: answer with the gold answers (checks the scoring path)"),
          out: Path | None = typer.Option(None, help="write results as JSON here")) -> None:
    """Accuracy of models: on the toy task's held-out problems, or with --bench on real benchmarks (a table
    of pass@1, pass@k, mean length and truncation rate per benchmark, and JSON with --out)."""
    cfg = _setup(config, set_, "eval")
    if bench:
        from services.datasets import DataError

        ks = sorted({int(x) for x in k.split(",")})
        try:
            _entry("generator.bench_eval", "evaluate_benches")(
                cfg, model[0] if model else None, [b.strip() for b in bench.split(",") if b.strip()], n=n, ks=ks,
                limit=limit, template_name=template, oracle=oracle, out=out)
        except (DataError, ValueError) as exc:
            typer.secho(f"eval error: {exc}", fg="red", err=True)
            raise typer.Exit(2) from None
        return
    if not model:
        typer.secho("eval error: --model is required", fg="red", err=True)
        raise typer.Exit(2)
    results = _entry("generator.evaluate", "evaluate")(cfg, model, out)
    for name, r in results.items():
        typer.echo(f"{name}: accuracy {r['accuracy']:.3f}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

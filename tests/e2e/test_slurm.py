"""deploy/slurm/ on a real SLURM cluster: a one-node slurmctld + slurmd on this machine (tests/support/slurm.py).
The tiny run is submitted through deploy/slurm/orz.sbatch in its single-node form (Redis, the reward server, one
generator and the learner as job steps), a second generator joins as a job array through
deploy/slurm/generators.sbatch, and the run's metrics.jsonl shows both generators' groups trained and every task
accounted for."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from services.metrics import free_port
from tests.support.harness import ROOT
from tests.support.slurm import LocalSlurm, available

STEPS = 12


@pytest.mark.slow
def test_the_tiny_run_through_sbatch_with_a_generator_array(tmp_path: Path) -> None:
    why = available()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the SLURM test needs a local cluster on CI: {why}")
        pytest.skip(why)
    sets = ["--set", f"run_dir={tmp_path / 'runs'}", "--set", "run_name=slurm",
            "--set", f"learner.total_steps={STEPS}", "--set", "learner.checkpoint_every=0",
            "--set", "generator.weight_wait_s=120"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORZ__")}
    env.update(ORZ_PYTHON=sys.executable, ORZ_GENERATORS="1", ORZ_REDIS_PORT=str(free_port()),
               ORZ_REWARD_PORT=str(free_port()))
    run = tmp_path / "runs" / "slurm"
    with LocalSlurm(tmp_path / "slurm") as cluster:
        cluster.env = {**cluster.env, **{k: v for k, v in env.items() if k != "SLURM_CONF"}}
        main = cluster.run("sbatch", "--parsable", "--nodes=1", "--cpus-per-task=1", f"--chdir={ROOT}",
                           f"--output={tmp_path}/orz-%j.out", str(ROOT / "deploy/slurm/orz.sbatch"),
                           str(ROOT / "configs/tiny.yaml"), *sets).strip()
        array = cluster.run("sbatch", "--parsable", "--array=0-0", "--cpus-per-task=1", f"--chdir={ROOT}",
                            f"--output={tmp_path}/gen-%A_%a.out", str(ROOT / "deploy/slurm/generators.sbatch"),
                            str(ROOT / "configs/tiny.yaml"), *sets).strip()
        deadline = time.time() + 900
        while time.time() < deadline:
            job = cluster.job(main)
            if job["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
                break
            time.sleep(2)
        out = "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("*.out")))
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((run / "logs").glob("slurm-*")))
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{out}\n{logs}"
        array_state = cluster.job(f"{array}_0")["JobState"]
        assert array_state in ("RUNNING", "COMPLETED"), array_state  # it ran beside the main job

    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    generators = {g for r in records for g in r["group_generators"]}
    assert "gen-0" in generators and f"gen-array-{array}-0" in generators, generators  # both trained on
    done = json.loads((run / "DONE").read_text())
    assert done["steps"] == STEPS and done["unaccounted"] == []
    head_env = (run / "slurm-head.env").read_text()
    assert "redis://" in head_env and env["ORZ_REDIS_PORT"] in head_env
    for name in ("redis", "reward", "generator-0", "learner"):
        assert (run / "logs" / f"slurm-{name}.log").exists(), name

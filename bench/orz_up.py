"""Run `orz up` as a benchmark's subprocess, exactly as a user does, and fail loudly with its output."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def orz_up(config: Path, run_dir: Path, name: str, sets: list[str], skip_eval: bool = False,
           timeout_s: float = 3600) -> float:
    """`orz up --config CONFIG` with run_dir/run_name and `--set` pairs; returns its wall time in seconds. The
    caller's ORZ__ variables are not passed on, so only the config and `sets` decide the run."""
    cmd = [sys.executable, "-m", "services.cli", "up", "--config", str(config), *(["--skip-eval"] if skip_eval else []),
           "--set", f"run_dir={run_dir}", "--set", f"run_name={name}"]
    for pair in sets:
        cmd += ["--set", pair]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORZ__")}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"orz up ({name}) failed with exit code {proc.returncode}")
    return time.time() - t0

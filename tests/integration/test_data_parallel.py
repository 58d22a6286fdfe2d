"""Data parallel learner: two FSDP2 ranks over gloo (real torchrun, real process group) train exactly as one
process on the same batch — same losses, same gradient norms, same updated weights to fp64 round-off."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, advantage: str, ranks: int | None) -> dict:
    if ranks is None:  # a plain process: no torch.distributed at all
        cmd = [sys.executable, str(WORKER), str(out), advantage]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               str(WORKER), str(out), advantage]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "stats.json").read_text())


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_two_ranks_match_one_process(tmp_path: Path, advantage: str) -> None:
    single = _run(tmp_path / "one", advantage, None)
    double = _run(tmp_path / "two", advantage, 2)
    assert single["world"] == 1 and double["world"] == 2
    assert 0 < double["shares"] < 6  # rank 0 really trained on a part of the groups only

    keys = ["policy_loss", "actor_grad_norm", "advantage_mean", "tokens"]
    if advantage == "gae":
        keys += ["value_loss", "critic_grad_norm", "value_mean"]
    for it, (a, b) in enumerate(zip(single["history"], double["history"], strict=True)):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), (it, k)
        # Stats accumulated from float32 tensors (the behaviour log-probs travel as float32).
        for k in ("behavior_kl", "is_weight_mean", "is_truncated_frac"):
            assert b[k] == pytest.approx(a[k], rel=1e-6), (it, k)
    assert single["history"][0]["is_truncated_frac"] > 0  # the IS truncation was exercised
    assert single["history"][0]["microbatches"] > 1  # so was gradient accumulation

    for name in ("actor", "critic") if advantage == "gae" else ("actor",):
        a = load_file(str(tmp_path / "one" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "two" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] - b[k]).abs().max().item() < 1e-10, k
    # and the step really moved the weights (a no-op trainer would pass the comparison above)
    from tests.integration.dp_worker import make_models

    actor0, _ = make_models()
    moved = max((actor0.state_dict()[k] - v).abs().max().item()
                for k, v in load_file(str(tmp_path / "one" / "actor.safetensors")).items())
    assert moved > 1e-4

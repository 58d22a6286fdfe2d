"""Data parallel learner: two FSDP2 ranks over gloo (real torchrun, real process group) train exactly as one
process on the same batch — same losses, same gradient norms, same updated weights to fp64 round-off."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).parents[1] / "support" / "dp_worker.py"
ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, advantage: str, ranks: int | None, features: str = "") -> dict:
    if ranks is None:  # a plain process: no torch.distributed at all
        cmd = [sys.executable, str(WORKER), str(out), advantage, features]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               str(WORKER), str(out), advantage, features]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "stats.json").read_text())


KEYS = ["policy_loss", "actor_grad_norm", "advantage_mean", "tokens"]
CRITIC_KEYS = ["value_loss", "critic_grad_norm", "value_mean"]


@pytest.mark.parametrize(("advantage", "features"), [("gae", ""), ("grpo", ""), ("gae", "checkpointing,chunked"),
                                                   ("gae", "checkpointing,chunked,packed"), ("gae", "epochs"),
                                                   ("grpo", "seqmean"), ("grpo", "drgrpo,cliphigh,overlong,masktrunc")])
def test_two_ranks_match_one_process(tmp_path: Path, advantage: str, features: str) -> None:
    single = _run(tmp_path / "one", advantage, None, features)
    double = _run(tmp_path / "two", advantage, 2, features)
    assert single["world"] == 1 and double["world"] == 2
    on = set(filter(None, features.split(",")))
    for run in (single, double):
        assert {k: run["active"][k] for k in ("chunked", "checkpointing")} == {
            "chunked": "chunked" in on, "checkpointing": "checkpointing" in on}
    assert 0 < double["shares"] < 6  # rank 0 really trained on a part of the groups only
    for run in (single, double):  # packed micro-batches have no padding; padded ones here do
        assert all((h["padded_fraction"] == 0) == ("packed" in on) for h in run["history"])

    keys = KEYS + (CRITIC_KEYS if advantage == "gae" else [])
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
    from tests.support.dp_worker import make_models

    actor0, _ = make_models()
    moved = max((actor0.state_dict()[k] - v).abs().max().item()
                for k, v in load_file(str(tmp_path / "one" / "actor.safetensors")).items())
    assert moved > 1e-4


def test_checkpointing_and_chunked_logprobs_change_nothing(tmp_path: Path) -> None:
    """Activation checkpointing and chunked log-probs on (one process, fp64): the same losses, gradient norms and
    updated weights as with both off."""
    plain = _run(tmp_path / "plain", "gae", None)
    both = _run(tmp_path / "both", "gae", None, "checkpointing,chunked")
    assert plain["active"] == {"chunked": False, "checkpointing": False}
    assert both["active"] == {"chunked": True, "checkpointing": True}
    for it, (a, b) in enumerate(zip(plain["history"], both["history"], strict=True)):
        for k in KEYS + CRITIC_KEYS + ["behavior_kl", "is_weight_mean"]:
            assert b[k] == pytest.approx(a[k], rel=1e-10, abs=1e-13), (it, k)
    for name in ("actor", "critic"):
        a = load_file(str(tmp_path / "plain" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "both" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] - b[k]).abs().max().item() < 1e-12, k


def test_packing_changes_nothing(tmp_path: Path) -> None:
    """learner.packing (one process, fp64): padding-free micro-batches, split by their real tokens, give the same
    losses, gradient norms and updated weights as padded ones."""
    plain = _run(tmp_path / "plain", "gae", None)
    packed = _run(tmp_path / "packed", "gae", None, "packed")
    for it, (a, b) in enumerate(zip(plain["history"], packed["history"], strict=True)):
        assert a["padded_fraction"] > 0.01 and b["padded_fraction"] == 0, it
        assert b["microbatches"] < a["microbatches"], it  # the same budget holds more real tokens
        for k in KEYS + CRITIC_KEYS + ["behavior_kl", "is_weight_mean"]:
            assert b[k] == pytest.approx(a[k], rel=1e-10, abs=1e-13), (it, k)
    for name in ("actor", "critic"):
        a = load_file(str(tmp_path / "plain" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "packed" / f"{name}.safetensors"))
        for k in a:
            assert (a[k] - b[k]).abs().max().item() < 1e-12, k


def test_bf16_mixed_precision_on_one_and_two_ranks(tmp_path: Path) -> None:
    """learner.dtype bfloat16: decoder layers compute in bf16 while the parameters the optimiser steps and its
    Adam states stay fp32, on one process (a one-rank FSDP2 group) as on two; losses stay close to fp32's."""
    fp32 = _run(tmp_path / "fp32", "gae", None)
    one = _run(tmp_path / "bf16-1", "gae", None, "bf16,chunked")
    two = _run(tmp_path / "bf16-2", "gae", 2, "bf16,chunked")
    for run in (one, two):
        assert run["active"]["compute_dtypes"] == ["torch.bfloat16"]
        assert run["active"]["master_dtypes"] == ["torch.float32"]
        assert run["active"]["adam_state_dtypes"] == ["torch.float32"]
    for a, b, c in zip(fp32["history"], one["history"], two["history"], strict=True):
        for k in ("policy_loss", "value_loss", "value_mean"):
            assert b[k] == pytest.approx(a[k], rel=0.05, abs=0.02), k  # bf16 rounding (8 bits of mantissa)
            assert c[k] == pytest.approx(b[k], rel=0.02, abs=0.01), k  # the same semantics on 1 and 2 ranks

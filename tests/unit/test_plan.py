"""`orz plan` and `orz config` (services/plan.py, services/memplan.py): model sizes against real models, memory
terms worked by hand, the recipes fit their GPUs, the closed-form decode rate against the simulated engine, and
the commands as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

from generator.sim_engine import SimEngine
from learner.critic import Critic
from services.config_io import load_config
from services.costmodel import QWEN25_7B, CostModel, LengthModel
from services.memplan import GPUS, QWEN25, LearnerSetting, ModelShape, learner_memory
from services.plan import fit_warning, plan, train_flops_per_token
from services.protocol import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
ORZ = [sys.executable, "-m", "services.cli"]


def _hf_config(s: ModelShape) -> Qwen2Config:
    return Qwen2Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                       num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                       tie_word_embeddings=s.tied)


@pytest.mark.parametrize("shape", [QWEN25["qwen2.5-0.5b"], QWEN25["qwen2.5-7b"],
                                   ModelShape("odd", 1000, 96, 200, 3, 6, 3, tied=False)], ids=lambda s: s.name)
def test_parameter_counts_are_the_real_models(shape: ModelShape) -> None:
    """Counted from the models themselves, built on the meta device (no memory)."""
    with torch.device("meta"):
        actor = Qwen2ForCausalLM(_hf_config(shape))
        critic = Critic(Qwen2Model(_hf_config(shape)), shape.hidden)
    assert shape.params == sum(p.numel() for p in actor.parameters())
    assert shape.critic_params == sum(p.numel() for p in critic.parameters())


def test_published_sizes() -> None:
    # Qwen2.5's model cards: 0.49B and 7.61B parameters
    assert QWEN25["qwen2.5-0.5b"].params == pytest.approx(0.494e9, rel=0.01)
    assert QWEN25["qwen2.5-7b"].params == pytest.approx(7.62e9, rel=0.01)
    assert QWEN25["qwen2.5-7b"].kv_bytes_per_token() == 2 * 28 * 4 * 128 * 2


def test_memory_terms_by_hand() -> None:
    s = ModelShape("hand", vocab=1000, hidden=64, intermediate=256, layers=2, heads=4, kv_heads=2)
    p, c = s.params, s.critic_params
    st = LearnerSetting(world=4, dtype="bfloat16", checkpointing=True, chunk_tokens=100, microbatch_tokens=4096,
                        width=1024, response_fraction=0.5)
    m = learner_memory(s, st)
    assert m["params"] == 4 * (p + c) / 4 and m["grads"] == 4 * (p + c) / 4 and m["optimizer"] == 8 * (p + c) / 4
    # checkpointing keeps each layer's bf16 input, plus the final norm (fp32 copy + bf16 in and out) and rotary
    assert m["activations"] == 2 * 4096 * 64 * 2 + 4096 * 64 * (4 + 4) + 2 * 4096 * 16 * 2
    assert m["attention_mask"] == 4 * 4096 * 1024  # a float [rows, 1, width, width] mask
    # 2,048 response positions' bf16 hidden states; a 100-token chunk: fp32 logits + bf16 matmul output;
    # the head's fp32 weight gradient and its bf16 cast
    assert m["logits"] == 2048 * 64 * 2 + 100 * 1000 * (4 + 2) + 1000 * 64 * (4 + 2)
    assert m["peak"] == m["persistent"] + max(m[k] for k in m if k.startswith("phase_"))
    # without chunking the whole [tokens x vocab] logits, their fp32 log-softmax and its gradient
    full = learner_memory(s, LearnerSetting(world=4, dtype="bfloat16", chunk_tokens=0, microbatch_tokens=4096))
    assert full["logits"] == 4096 * 1000 * 4 + 4096 * 1000 * (2 + 4)
    # packed rows: a block-diagonal [T x T] bool mask under SDPA, none under flash-attention (whose keys and
    # values are not repeated per head either)
    packed = LearnerSetting(world=4, dtype="bfloat16", microbatch_tokens=4096, width=1024, padded=False, packed=True)
    assert learner_memory(s, packed)["attention_mask"] == 4096 * 4096
    flash = LearnerSetting(world=4, dtype="bfloat16", microbatch_tokens=4096, width=1024, padded=False, packed=True,
                           attention="flash_attention_2")
    assert learner_memory(s, flash)["attention_mask"] == 0
    per_token = learner_memory(s, packed)["activations"] - learner_memory(s, flash)["activations"]
    assert per_token == 2 * 4096 * 2 * (s.q_dim - s.kv_dim) * 2  # layers x tokens x (K, V) x extra width x bf16


@pytest.mark.parametrize("recipe", ["orz-7b", "orz-32b"])
def test_recipes_fit_their_gpus_with_headroom(recipe: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml", environ={})
    assert (cfg.learner.dtype, cfg.learner.activation_checkpointing) == ("bfloat16", True)
    p = plan(cfg, "h100-80gb")
    assert p["fits"], p["problems"]
    assert p["learner"]["headroom"] >= 0.10 and p["generator"]["headroom"] >= 0.10
    assert p["generator"]["sequences_at_max_len"] >= 32
    # on the bigger GPU the same config has more room, never less
    assert plan(cfg, "h200-141gb")["learner"]["headroom"] > p["learner"]["headroom"]


def _plan_json(*args: str) -> dict:
    proc = subprocess.run([*ORZ, "plan", *args, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if not k.startswith("ORZ__")}, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_plan_says_an_fp32_unchunked_uncheckpointed_7b_does_not_fit() -> None:
    sets = ["learner.dtype=float32", "learner.activation_checkpointing=false", "learner.logits_chunk_tokens=0",
            "learner.max_tokens_per_microbatch=65536"]
    p = _plan_json("-c", "configs/orz-7b.yaml", *[x for s in sets for x in ("--set", s)])
    assert not p["fits"] and not p["learner"]["fits"] and p["generator"]["fits"]
    lr = p["learner"]["per_rank_gb"]
    # the arithmetic: fp32 logits of 65,536 tokens x 152,064 = 40 GB, with the log-softmax and its gradient
    assert lr["logits"] == pytest.approx(65536 * 152064 * 12 / 1e9, rel=1e-6)
    assert lr["peak"] > 80 and p["learner"]["headroom"] < 0
    assert any("learner rank needs" in x for x in p["problems"])
    text = subprocess.run([*ORZ, "plan", "-c", "configs/orz-7b.yaml", *[x for s in sets for x in ("--set", s)]],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "DOES NOT FIT" in text and text.strip().splitlines()[-1].startswith("does not fit")


def test_plan_json_keys_are_the_documented_ones() -> None:
    p = _plan_json("-c", "configs/orz-7b.yaml")
    readme = (ROOT / "docs" / "learner.md").read_text().split("<!-- plan-keys:start -->")[1] \
        .split("<!-- plan-keys:end -->")[0]
    keys = {"gpu", "model", "learner", "generator", "step", "fits", "problems"}
    assert set(p) == keys
    for section in ("learner", "generator", "step"):
        for key in p[section]:
            assert f"`{section}.{key}`" in readme, f"docs/learner.md does not document {section}.{key}"
    for key in p["learner"]["per_rank_gb"]:
        assert f"`{key}`" in readme


def _simulated_rate(cost: CostModel, lengths: LengthModel, prompt: int, prompts: int = 400, n: int = 64) -> float:
    """Tokens/s of a SimEngine kept full, stepped iteration chunk by chunk (what bench/simulate.py measures)."""
    engine = SimEngine(cost, lengths, 0.0, seed=0, chars_per_token=0)
    for i in range(prompts):
        engine.submit(f"p{i}", [1] * prompt, SamplingParams(1.0, 1.0, lengths.max_tokens), n)
    while engine.waiting:
        engine.step()
    return engine.decoded_tokens / engine.simulated_s


@pytest.mark.parametrize("kv_gb", [None, 2.0, 5.0, 20.0])
def test_closed_form_decode_rate_agrees_with_the_simulated_engine(kv_gb: float | None) -> None:
    cfg = load_config(ROOT / "configs" / "orz-7b.yaml", environ={})
    from services.plan import cost_model

    cost = cost_model(cfg, QWEN25["qwen2.5-7b"], "h100-80gb")
    if kv_gb is not None:
        from dataclasses import replace

        cost = replace(cost, kv_cache_bytes=kv_gb * 1e9)
    lengths = LengthModel(1000, 0.7, 8000)
    closed = cost.steady_decode_rate(lengths, 200)["tokens_per_s"]
    assert closed == pytest.approx(_simulated_rate(cost, lengths, 200), rel=0.10)


def test_step_time_is_the_cost_model_by_hand() -> None:
    cfg = load_config(ROOT / "configs" / "orz-7b.yaml", environ={})
    flops = train_flops_per_token(cfg)
    # checkpointed forward+backward 8; one policy step, a value pass, 12 critic steps over mini-batches: one pass
    assert flops == {"policy": 8.0, "value_pass": 2.0, "critic": 8.0, "total": 18.0}
    epochs = load_config(ROOT / "configs" / "orz-7b.yaml", environ={}, overrides={"learner": {"step_over": "batch"}})
    assert train_flops_per_token(epochs)["critic"] == 96.0  # 12 full-batch passes
    p = plan(cfg, "h100-80gb")
    s = p["step"]
    samples, tokens = 128 * 64, 200 + s["mean_response_tokens"]
    gpu = GPUS["h100-80gb"]
    flop = 18 * p["model"]["params"] * samples * tokens
    assert s["train_s"] == pytest.approx(flop / (8 * gpu.peak_bf16_flops * 0.35))
    rate = s["decode_tokens_per_s_per_generator"]
    assert s["gen_s"] == pytest.approx(samples * s["mean_response_tokens"] / (24 * rate))
    assert s["step_s"] == max(s["gen_s"], s["train_s"])  # overlapped: max_staleness 1
    mean = LengthModel(1000, 0.7, 8000).mean()
    assert s["mean_response_tokens"] == pytest.approx(mean)
    sync = plan(load_config(ROOT / "configs" / "orz-7b.yaml", environ={},
                            overrides={"learner": {"max_staleness": 0}}), "h100-80gb")["step"]
    assert sync["step_s"] == pytest.approx(sync["gen_s"] + sync["train_s"])


def test_fit_warning() -> None:
    cfg = load_config(ROOT / "configs" / "orz-7b.yaml", environ={})
    need = plan(cfg, "h100-80gb")["learner"]["per_rank_gb"]["peak"] * 1e9
    assert fit_warning(cfg, "GPU", need * 1.01, cuda=True) is None
    warning = fit_warning(cfg, "GPU", need * 0.9, cuda=True)
    assert warning and "activation_checkpointing" in warning and f"{need / 1e9:.1f} GB" in warning


def _seven_b_dir(tmp_path: Path) -> Path:
    """A Qwen2.5-7B-shaped config.json and nothing else: in fp32 on this CPU it cannot fit."""
    model = tmp_path / "Qwen2.5-7B"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**_hf_config(QWEN25["qwen2.5-7b"]).to_dict(),
                                                   "architectures": ["Qwen2ForCausalLM"]}))
    return model


def test_learner_warns_at_start_when_the_config_will_not_fit(tmp_path: Path) -> None:
    """`orz learner` as a deployment starts it: the warning comes first (the model's weights are not there, so
    it then stops on loading them)."""
    model = _seven_b_dir(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORZ__")}
    proc = subprocess.run([*ORZ, "learner", "--set", f"model.base_path={model}", "--set",
                           f"run_dir={tmp_path / 'runs'}", "--set", "redis.url=redis://127.0.0.1:1/0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert "orz plan predicts a learner rank will need" in out, out[-3000:]
    need = float(out.split("will need ")[1].split(" GB")[0])
    assert need > 100  # 7.6B actor + critic with fp32 Adam states alone are ~240 GB


def test_up_warns_at_start_when_the_config_will_not_fit(tmp_path: Path) -> None:
    """`orz up` prints the plan's warning before it starts anything (stopped once it has)."""
    model = _seven_b_dir(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORZ__")}
    proc = subprocess.Popen([*ORZ, "up", "--skip-eval", "--set", f"model.base_path={model}", "--set",
                             f"run_dir={tmp_path / 'runs'}", "--set", "generator.num=0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            seen.append(line)
            if "orz plan predicts" in line or len(seen) > 200:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert any("orz plan predicts a learner rank will need" in line for line in seen), "".join(seen)[-3000:]
    assert not any("redis-server pid" in line for line in seen[: next(
        i for i, line in enumerate(seen) if "orz plan predicts" in line)])  # before anything started


def test_orz_config_prints_the_resolved_config(tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ORZ__")}, "ORZ__LEARNER__SEED": "5"}
    proc = subprocess.run([*ORZ, "config", "-c", "configs/tiny.yaml", "--set", "learner.total_steps=7"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120, check=True)
    printed = yaml.safe_load(proc.stdout)
    assert printed["learner"]["total_steps"] == 7 and printed["learner"]["seed"] == 5
    file_value = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["learner"]["batch_prompts"]
    assert printed["learner"]["batch_prompts"] == file_value
    assert printed["weight_sync"]["bucket_mb"] == 512  # a default the file does not set
    (tmp_path / "resolved.yaml").write_text(proc.stdout)
    again = load_config(tmp_path / "resolved.yaml", environ={})
    assert again.model_dump() == load_config(ROOT / "configs" / "tiny.yaml", environ={"ORZ__LEARNER__SEED": "5"},
                                             overrides={"learner": {"total_steps": 7}}).model_dump()


def test_orz_config_names_every_bad_key_and_value() -> None:
    sets = ["learner.bogus=1", "learner.dtype=fp8", "sampling.top_p=2", "learner.batch_prompts=0",
            "generator.kv_cache_mb=lots"]
    proc = subprocess.run([*ORZ, "config", "-c", "configs/tiny.yaml", *[x for s in sets for x in ("--set", s)]],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    for key in ("learner.bogus", "learner.dtype", "sampling.top_p", "learner.batch_prompts", "generator.kv_cache_mb"):
        assert key in proc.stderr, (key, proc.stderr)


def test_unknown_gpu_and_shape_are_clear_errors() -> None:
    for args in (["--gpu", "h900"], ["--model-shape", "qwen9"]):
        proc = subprocess.run([*ORZ, "plan", "-c", "configs/orz-7b.yaml", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 2 and "plan error" in proc.stderr and args[1] in proc.stderr


def test_mean_context_is_length_biased() -> None:
    """A running sequence is seen at an age uniform over its length, long ones more often: E[L²] / (2 E[L])."""
    lengths = LengthModel(1000, 0.7, 8000)
    draws = lengths.sample(np.random.default_rng(0), 200_000).astype(float)
    r = CostModel(QWEN25_7B).steady_decode_rate(lengths, 200)
    assert r["mean_context"] == pytest.approx(200 + (draws**2).mean() / (2 * draws.mean()))
    assert r["running"] == 256 and r["mean_response_tokens"] == pytest.approx(draws.mean())


@pytest.mark.parametrize("recipe", ["orz-7b", "orz-32b"])
def test_docs_show_the_recipes_plan_as_it_is(recipe: str) -> None:
    from services.plan import render

    text = render(plan(load_config(ROOT / "configs" / f"{recipe}.yaml", environ={}), "h100-80gb"))
    pages = "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    assert f"$ orz plan -c configs/{recipe}.yaml\n{text}\n```" in pages

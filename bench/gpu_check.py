"""`make gpu-check`: one short prepared script for a GPU machine, one JSON report.

On Qwen2-architecture models of Qwen2.5-0.5B's and 1.5B's shapes (random init, no download):
- a bf16 learner iteration (the learner's own model preparation and PPOTrainer: FSDP2 mixed precision,
  activation checkpointing, chunked log-probs; a value pass, one policy step, one critic step): tokens/s, MFU
  (6·N FLOPs per token and pass, 8·N with the recomputation, against the GPU's dense BF16 peak), and the peak
  `torch.cuda.max_memory_allocated` beside `orz plan`'s prediction (services/memplan.py) for the same setting;
- the learner's log-probs in bf16 against fp32 on the same weights: max and mean |Δ| over response tokens;
- the transformers generator (generator/hf_engine.py) on the GPU: decoded tokens/s.

Without a GPU, or with --reduced, it runs the same code on a small shape on the CPU, so CI keeps it working.

    python bench/gpu_check.py [--reduced] [--shapes 0.5b,1.5b] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import random_ppo
import torch

from generator.hf_engine import TransformersEngine
from learner import parallel
from learner.models import prepare
from learner.trainer import PPOTrainer, token_logprobs
from services.config import LearnerConfig
from services.memplan import GB, GPUS, QWEN25, LearnerSetting, ModelShape, learner_memory
from services.protocol import SamplingParams

GPU_SHAPES = {"0.5b": QWEN25["qwen2.5-0.5b"], "1.5b": QWEN25["qwen2.5-1.5b"]}
REDUCED = {"reduced": ModelShape("reduced", 4096, 128, 384, 2, 4, 2, tied=True)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_flops(device: torch.device) -> float | None:
    """The GPU's dense BF16 peak from the spec sheets in services/memplan.py (H100's when unknown); None on CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, gpu in GPUS.items():
        if key.split("-")[0] in name:
            return gpu.peak_bf16_flops
    return GPUS["h100-80gb"].peak_bf16_flops


def learner_iteration(s: ModelShape, rows: int, width: int, dp: parallel.DataParallel) -> dict:
    lc = LearnerConfig(dtype="bfloat16", activation_checkpointing=True, logits_chunk_tokens=min(2048, rows * width),
                       critic_steps_per_iter=1, max_tokens_per_microbatch=rows * width, warmup_steps=1)
    actor, critic = random_ppo.models(s, width, dp.device)
    prepare(lc, dp, actor, critic)
    trainer = PPOTrainer(lc, actor, critic, None, None)
    sizes = random_ppo.lengths(rows, width)
    batch = random_ppo.batch(s, sizes)
    trainer.step(batch)  # gradients and Adam states exist from here on
    _sync(dp.device)
    t0 = time.perf_counter()
    stats = trainer.step(batch)
    _sync(dp.device)
    seconds = time.perf_counter() - t0
    tokens = sum(p + r for p, r in sizes)
    # checkpointed policy pass 8·N, value pass 2·N, one checkpointed critic pass 8·N (per real token)
    flops = (8 * s.params + 2 * s.critic_params + 8 * s.critic_params) * tokens
    setting = LearnerSetting(world=1, dtype="bfloat16", checkpointing=True, chunk_tokens=lc.logits_chunk_tokens,
                             microbatch_tokens=rows * width, width=width,
                             response_fraction=sum(r for _, r in sizes) / (rows * width), padded=rows > 1)
    predicted = learner_memory(s, setting)["peak"] / GB
    out = {"rows": rows, "width": width, "tokens": tokens, "iteration_s": round(seconds, 3),
           "tokens_per_s": round(tokens / seconds, 1), "tflops": round(flops / seconds / 1e12, 3),
           "predicted_peak_gb": round(predicted, 3), "policy_loss": stats["policy_loss"]}
    peak_flops = _peak_flops(dp.device)
    if peak_flops:
        out["mfu"] = round(flops / seconds / peak_flops, 4)
    if dp.device.type == "cuda":
        measured = torch.cuda.max_memory_allocated(dp.device) / GB
        out.update(measured_peak_gb=round(measured, 3), measured_over_predicted=round(measured / predicted, 3))
    del trainer, actor, critic
    return out


def bf16_against_fp32(s: ModelShape, rows: int, width: int, dp: parallel.DataParallel) -> dict:
    """The same weights' log-probs: fp32 as loaded, and bf16 through the learner's mixed-precision sharding."""
    actor, _ = random_ppo.models(s, width, dp.device, seed=1)
    half = copy.deepcopy(actor)
    lc = LearnerConfig(dtype="bfloat16", logits_chunk_tokens=min(2048, rows * width))
    prepare(lc, dp, half)
    prepare(LearnerConfig(dtype="float32", logits_chunk_tokens=lc.logits_chunk_tokens),
            parallel.DataParallel(device=dp.device), actor)
    mb = random_ppo.batch(s, random_ppo.lengths(rows, width), seed=1).to(dp.device)
    with torch.no_grad():
        full = token_logprobs(actor.eval(), mb)
        low = token_logprobs(half.eval(), mb)
    mask = mb.response_mask.bool()
    diff = (full - low).abs()[mask]
    return {"tokens": int(mask.sum()), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "mean_logprob_fp32": float(full[mask].mean())}


def _model_dir(s: ModelShape, dtype: torch.dtype, root: Path) -> Path:
    """A random-init model saved with a word-level tokenizer covering its whole vocabulary."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    actor, _ = random_ppo.models(s, 4096, "cpu", seed=2)
    actor.config.eos_token_id = s.vocab - 1
    actor.to(dtype).save_pretrained(root)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(s.vocab)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{s.vocab - 1}", pad_token="t0").save_pretrained(root)
    return root


def generator_rate(s: ModelShape, device: torch.device, prompts: int, n: int, prompt_len: int, new: int) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        engine = TransformersEngine(_model_dir(s, dtype, Path(tmp)), dtype=str(dtype).removeprefix("torch."),
                                    max_model_len=prompt_len + new + 1, max_num_seqs=prompts * n, device=str(device))
        ids = [[1 + (7 * i + j) % (s.vocab - 2) for j in range(prompt_len)] for i in range(prompts)]
        params = [SamplingParams(1.0, 1.0, new)] * prompts
        engine.generate(ids[:1], params[:1], [1])  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        out = engine.generate(ids, params, [n] * prompts)
        _sync(device)
        seconds = time.perf_counter() - t0
    decoded = sum(len(c.token_ids) for group in out for c in group)
    return {"sequences": prompts * n, "prompt_tokens": prompt_len, "max_new_tokens": new, "decoded_tokens": decoded,
            "seconds": round(seconds, 3), "tokens_per_s": round(decoded / seconds, 1), "dtype": str(dtype)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reduced", action="store_true", help="the small CPU mode even when there is a GPU")
    ap.add_argument("--shapes", default="0.5b,1.5b", help="GPU mode: shapes to run (0.5b, 1.5b)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.reduced
    shapes = {k: GPU_SHAPES[k] for k in args.shapes.split(",")} if gpu else REDUCED
    # GPU: 8 sequences of up to 2,048 tokens per iteration; the generator 64 prompts x 4 samples of 256 tokens
    rows, width = (8, 2048) if gpu else (4, 64)
    gen = (64, 4, 128, 256) if gpu else (4, 2, 16, 16)
    torch.set_num_threads(2) if not gpu else None
    dp = parallel.init_from_env(mixed_precision=True)
    report = {"benchmark": "gpu_check", "date": dt.date.today().isoformat(), "mode": "gpu" if gpu else "reduced",
              "device": torch.cuda.get_device_name(dp.device) if gpu else f"CPU ({platform.machine()})",
              "torch": torch.__version__, "shapes": {}}
    t_start = time.perf_counter()
    for name, s in shapes.items():
        print(f"gpu_check: {name} ({s.params / 1e6:.0f}M parameters) …", file=sys.stderr, flush=True)
        entry = {"params": s.params, "learner": learner_iteration(s, rows, width, dp)}
        if gpu:
            torch.cuda.empty_cache()
        entry["logprobs_bf16_vs_fp32"] = bf16_against_fp32(s, rows, width, dp)
        if gpu:
            torch.cuda.empty_cache()
        entry["generator"] = generator_rate(s, dp.device, *gen)
        report["shapes"][name] = entry
        print(json.dumps({name: entry}), file=sys.stderr, flush=True)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    parallel.close(dp)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

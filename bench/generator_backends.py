"""Generator backends: vLLM against the transformers fallback on the same prompts and model, in one run.

The model is a ~25M-parameter Qwen2 (hidden 512, 8 layers, 8 heads / 2 KV heads, MLP 1408, random init)
with the tiny config's tokenizer, saved to a temporary directory. Both engines sample the same prompts
(`--prompts` × `--samples`, temperature 1, `--max-tokens`), one after the other with the same thread count,
after a warm-up call; a random model rarely emits EOS, so nearly every sample runs to `--max-tokens`.
Throughput is generated tokens per wall-clock second of one `generate` call. The transformers engine is
run at each `--hf-batch` (its `max_num_seqs`) and its best is the baseline. Prints JSON; goal: vLLM ≥ 2×.

    python bench/generator_backends.py --prompts 64 --samples 4 --max-tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from services.config_io import load_config
from services.protocol import SamplingParams
from services.tasks import all_problems, split

ROOT = Path(__file__).resolve().parents[1]


def build_model(tokenizer_dir: Path, out: Path) -> int:
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, torch_dtype="float32")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(str(out))
    for f in tokenizer_dir.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return sum(p.numel() for p in model.parameters())


def timed(engine, prompt_ids: list[list[int]], params: SamplingParams, n: int) -> dict:
    engine.generate(prompt_ids[:4], [params] * 4, [n] * 4)  # warm-up
    t0 = time.perf_counter()
    outs = engine.generate(prompt_ids, [params] * len(prompt_ids), [n] * len(prompt_ids))
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for comps in outs for c in comps)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--kv-cache-mb", type=int, default=512)
    ap.add_argument("--hf-batch", default="64,256", help="transformers max_num_seqs values to try")
    args = ap.parse_args()
    cfg = load_config(args.config)
    if not (cfg.model.path / "tokenizer.json").exists():
        raise SystemExit(f"no base model at {cfg.model.path}: run `orz make-base-model -c {args.config}` first")
    train, _ = split(all_problems(cfg.task.min_terms, cfg.task.max_terms, cfg.task.max_operand))
    with tempfile.TemporaryDirectory(prefix="orz-bench-") as tmp:
        model_dir = Path(tmp) / "model-25m"
        params_count = build_model(cfg.model.path, model_dir)
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        prompt_ids = [tok.encode(p.prompt, add_special_tokens=False) for p in train[: args.prompts]]
        params = SamplingParams(1.0, 1.0, args.max_tokens)
        max_len = max(len(p) for p in prompt_ids) + args.max_tokens + 8

        from generator.engine import VllmEngine
        from generator.hf_engine import TransformersEngine

        hf_runs = {}
        for batch in [int(b) for b in args.hf_batch.split(",")]:
            engine = TransformersEngine(model_dir, max_model_len=max_len, seed=0, threads=args.threads,
                                        max_num_seqs=batch)
            hf_runs[batch] = timed(engine, prompt_ids, params, args.samples)
            del engine
        vllm_engine = VllmEngine(model_dir, max_model_len=max_len, kv_cache_mb=args.kv_cache_mb, seed=0,
                                 threads=args.threads)
        vllm = timed(vllm_engine, prompt_ids, params, args.samples)
    best = max(hf_runs, key=lambda b: hf_runs[b]["tokens_per_s"])
    print(json.dumps({
        "benchmark": "generator_backends", "params": params_count, "prompts": args.prompts,
        "samples_per_prompt": args.samples, "max_tokens": args.max_tokens, "threads": args.threads,
        "vllm": {**vllm, "kv_cache_mb": args.kv_cache_mb},
        "transformers": {str(b): r for b, r in hf_runs.items()}, "transformers_best_max_num_seqs": best,
        "ratio": round(vllm["tokens_per_s"] / hf_runs[best]["tokens_per_s"], 3), "goal_ratio": 2.0,
    }, indent=1))


if __name__ == "__main__":
    main()

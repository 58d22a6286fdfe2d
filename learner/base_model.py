"""`orz make-base-model`: build the tiny CPU base model with no download.

1. Train a byte-level BPE tokenizer (`tokenizers`) on the toy task's prompts and worked responses.
2. Build a small Qwen2-architecture causal LM (random init, `transformers`).
3. Pretrain it briefly on traces that mix bare guesses (short, right only by chance) with worked solutions
   (long, right) (services/tasks.py): `skill_work_prob` of them worked at first, so that it learns to
   compute, then `work_prob` in the last `prior_steps`, so that it mostly guesses. The result is right
   some of the time, and right when it works the problem out — the starting point ORZ's recipe needs —
   saved in Hugging Face format (safetensors) with a `base_model.json` that records how it was made.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from services.config import Config
from services.tasks import all_problems, answer_range, pretraining_response, split

log = logging.getLogger("orz.base_model")

EOS = "<|endoftext|>"
PAD = "<pad>"


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # Digits are single tokens (as in Qwen2's tokenizer), so arithmetic is learnable by a tiny model.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD)


def _encode_pair(tokenizer: PreTrainedTokenizerFast, prompt: str, response: str) -> tuple[list[int], int]:
    # Prompt and response are tokenized separately and concatenated, exactly as at RL time (the feeder sends
    # prompt ids, the engine appends sampled ids), so pretraining sees the same token boundaries.
    p = tokenizer.encode(prompt, add_special_tokens=False)
    r = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    return p + r, len(p)


RECIPE_TASK_KEYS = ("min_terms", "max_terms", "max_operand")


def build_base_model(cfg: Config, out_dir: Path | None = None, force: bool = False) -> Path:
    mc, tc = cfg.model, cfg.task
    out = Path(out_dir) if out_dir is not None else mc.path
    # What the model is made from: the problem family and the model section. Other task keys (the data of a
    # dataset run, the prompt order's seed) do not change it, so adding one does not force a rebuild.
    recipe = {"task": {k: getattr(tc, k) for k in RECIPE_TASK_KEYS}, "model": mc.model_dump()}
    info_path = out / "base_model.json"
    if info_path.exists() and not force:
        built = json.loads(info_path.read_text())
        task = built.get("task") or {}
        if {"task": {k: task.get(k) for k in RECIPE_TASK_KEYS}, "model": built.get("model")} == recipe:
            log.info("base model already built at %s", out)
            return out
        log.info("base model at %s was built from another recipe; rebuilding", out)
    t0 = time.time()
    torch.manual_seed(mc.seed)
    rng = random.Random(mc.seed)
    problems = all_problems(tc.min_terms, tc.max_terms, tc.max_operand)
    train, heldout = split(problems)

    lo, hi = answer_range(tc.min_terms, tc.max_terms, tc.max_operand)

    def trace(p, step: int = 0):
        mix = mc.work_prob if step >= mc.pretrain_steps - mc.prior_steps else mc.skill_work_prob
        return pretraining_response(p, rng, mix, lo, hi)

    # The tokenizer sees every worked solution and every guess, whatever the mix.
    corpus = [p.prompt + p.response() for p in train] + [p.prompt + trace(p) for p in train]
    tokenizer = train_tokenizer(corpus, mc.vocab_size)

    model_cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads, num_key_value_heads=mc.num_kv_heads,
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(model_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("pretraining a %.2fM-parameter Qwen2 on %d problems for %d steps: %.0f%% of traces worked out (the "
             "rest guessed), %.0f%% in the last %d", n_params / 1e6, len(train), mc.pretrain_steps,
             100 * mc.skill_work_prob, 100 * mc.work_prob, mc.prior_steps)

    opt = torch.optim.AdamW(model.parameters(), lr=mc.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, mc.pretrain_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, mc.pretrain_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    loss_ema = None
    with Progress(TextColumn("[bold]pretrain"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn()) as progress:
        bar = progress.add_task("pretrain", total=mc.pretrain_steps, loss="-")
        for step in range(mc.pretrain_steps):
            batch = [rng.choice(train) for _ in range(mc.pretrain_batch)]
            encoded = [_encode_pair(tokenizer, p.prompt, trace(p, step)) for p in batch]
            width = max(len(ids) for ids, _ in encoded)
            input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full_like(input_ids, -100)
            attn = torch.zeros_like(input_ids)
            for i, (ids, plen) in enumerate(encoded):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                attn[i, : len(ids)] = 1
                labels[i, plen: len(ids)] = torch.tensor(ids[plen:])  # loss on the response only
            loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
            progress.update(bar, advance=1, loss=f"{loss_ema:.3f}")

    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info = {
        "params": n_params, "pretrain_steps": mc.pretrain_steps, "final_loss_ema": loss_ema,
        "work_prob": mc.work_prob, "skill_work_prob": mc.skill_work_prob, "train_problems": len(train),
        "heldout_problems": len(heldout), "seconds": round(time.time() - t0, 1),
        **recipe,
    }
    (out / "base_model.json").write_text(json.dumps(info, indent=2))
    log.info("base model written to %s in %.0f s (loss %.3f)", out, info["seconds"], loss_ema)
    return out

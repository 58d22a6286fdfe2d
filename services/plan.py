"""`orz plan`: whether a config fits its GPUs and how fast it will run, from arithmetic alone, in seconds.

Memory: services/memplan.py (validated against measured peaks by bench/learner_memory.py). Speed:
services/costmodel.py, the cost model of the cluster-scale simulation (bench/simulate.py), with the decode
rate of a full engine in closed form (`CostModel.steady_decode_rate`, checked against the simulated engine).
Nothing here runs a model or a simulation.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict

from services.config import Config
from services.costmodel import CostModel, GpuSpec, LengthModel, ModelSpec
from services.memplan import GB, GPUS, LearnerSetting, ModelShape, generator_memory, learner_memory, shape_for

HEADROOM = 0.10  # a config "fits" with at least this share of the memory left
LEARNER_RUNTIME_BYTES = 1.5e9  # CUDA context, cuBLAS/NCCL workspaces, allocator slack: an assumption
GENERATOR_OVERHEAD_BYTES = 2e9  # vLLM's activations and sampler beside weights and KV cache: an assumption
RESPONSE_SIGMA = 0.7  # log-normal spread of response lengths (bench/simulate.py's orz-7b preset)


def model_shape(cfg: Config, override: str | None = None) -> ModelShape:
    """The base model's shape: --model-shape, its config.json, its directory's name, or for the tiny base model
    not built yet the `model.*` fields it would be built from."""
    try:
        return shape_for(cfg.model.path, override)
    except ValueError:
        if cfg.model.path.name != "tiny-arith-base":
            raise
        m = cfg.model
        return ModelShape("tiny-arith-base", m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers,
                          m.num_heads, m.num_kv_heads, tied=True)


def learner_setting(cfg: Config, cuda: bool = True) -> LearnerSetting:
    """The learner rank a config runs: the widest micro-batch (prompt and response at their limits)."""
    lc = cfg.learner
    width = min(cfg.generator.max_model_len, cfg.task.max_prompt_tokens + cfg.sampling.max_tokens)
    tokens = max(lc.max_tokens_per_microbatch, width)  # a sequence longer than the budget is a micro-batch alone
    return LearnerSetting(
        world=lc.num_processes, dtype=lc.compute_dtype(cuda), checkpointing=lc.activation_checkpointing,
        chunk_tokens=lc.logits_chunk_tokens, microbatch_tokens=tokens, width=width,
        response_fraction=min(1.0, cfg.sampling.max_tokens / width), critic=lc.advantage == "gae",
        reference=lc.kl_coef > 0, padded=tokens > width and not lc.packing, entropy=lc.entropy_coef > 0,
        packed=lc.packing, attention=lc.attn_implementation)


def train_flops_per_token(cfg: Config) -> dict[str, float]:
    """FLOPs per parameter per trained token of one learner step, from the step's schedule (learner/trainer.py):
    a forward is 2, a forward and backward 6, and activation checkpointing adds a forward to each backward."""
    lc = cfg.learner
    fb = 8.0 if lc.activation_checkpointing else 6.0
    epochs = lc.step_over == "batch"  # every optimiser step over the whole batch; else one pass in all (ORZ)
    terms = {"policy": fb * (lc.policy_steps_per_iter if epochs else 1)}
    if lc.policy_steps_per_iter > 1:
        terms["proximal_pass"] = 2.0
    if lc.advantage == "gae":
        terms["value_pass"] = 2.0
        terms["critic"] = fb * (lc.critic_steps_per_iter if epochs else 1)
    if lc.kl_coef > 0:
        terms["reference_pass"] = 2.0
    terms["total"] = sum(terms.values())
    return terms


def rank_peak_bytes(mem: dict[str, float], cuda: bool) -> float:
    """A learner rank's peak: memplan's tensors, plus the CUDA context and workspaces on a GPU."""
    return mem["peak"] + (LEARNER_RUNTIME_BYTES if cuda else 0.0)


def cost_model(cfg: Config, shape: ModelShape, gpu_name: str) -> CostModel:
    gpu = GPUS[gpu_name]
    spec = ModelSpec(shape.name, float(shape.params), shape.layers, shape.kv_heads, shape.d)
    return CostModel(spec, GpuSpec(gpu.name, gpu.peak_bf16_flops, gpu.hbm_bytes_per_s, gpu.memory_bytes),
                     tp=cfg.generator.tensor_parallel_size, train_gpus=cfg.learner.num_processes,
                     train_flops_per_token=train_flops_per_token(cfg)["total"],
                     kv_cache_bytes=cfg.generator.kv_cache_mb * 2**20)


def plan(cfg: Config, gpu: str = "h100-80gb", model: str | None = None, response_median: float | None = None,
         prompt_tokens: int = 200) -> dict:
    """The whole prediction for `cfg` on `gpu` (a memplan.GPUS key), as a JSON-ready dict (docs/learner.md)."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    shape, device = model_shape(cfg, model), GPUS[gpu]
    setting = learner_setting(cfg)
    mem = learner_memory(shape, setting)
    budget = device.memory_bytes * (1 - HEADROOM)
    learner_peak = rank_peak_bytes(mem, cuda=True)
    terms = ("params", "grads", "optimizer", "activations", "attention_mask", "logits", "layer_backward",
             "fsdp_unsharded")
    learner = {
        "setting": asdict(setting),
        "per_rank_gb": {**{k: mem[k] / GB for k in terms}, "runtime": LEARNER_RUNTIME_BYTES / GB,
                        "peak": learner_peak / GB},
        "phases_gb": {k.removeprefix("phase_"): v / GB for k, v in mem.items() if k.startswith("phase_")},
        "peak_phase": mem["peak_phase"], "memory_gb": device.memory_bytes / GB,
        "fits": learner_peak <= budget, "headroom": 1 - learner_peak / device.memory_bytes,
    }
    gc_, lc = cfg.generator, cfg.learner
    median = response_median or min(1000.0, cfg.sampling.max_tokens / 2)
    lengths = LengthModel(median, RESPONSE_SIGMA, cfg.sampling.max_tokens)
    mean_len = lengths.mean()
    g = generator_memory(shape, device, gc_.tensor_parallel_size, gc_.kv_cache_mb * 2**20, gc_.max_model_len,
                         prompt_tokens + mean_len, overhead_bytes=GENERATOR_OVERHEAD_BYTES)
    generator = {
        "tensor_parallel": gc_.tensor_parallel_size,
        "per_gpu_gb": {k: g[k] / GB for k in ("weights", "kv_cache", "overhead", "peak")},
        "kv_tokens": int(g["kv_tokens"]), "sequences_at_max_len": int(g["sequences_at_max_len"]),
        "sequences_at_mean_context": int(g["sequences_at_mean_context"]), "memory_gb": device.memory_bytes / GB,
        "fits": g["peak"] <= budget, "headroom": g["headroom"],
    }
    cost = cost_model(cfg, shape, gpu)
    rate = cost.steady_decode_rate(lengths, prompt_tokens, gc_.max_inflight_requests * lc.n_samples)
    samples = lc.batch_prompts * lc.n_samples
    gen_s = samples * mean_len / (max(1, gc_.num) * rate["tokens_per_s"])
    train_s = cost.train_s(samples * (prompt_tokens + mean_len))
    step_s = max(gen_s, train_s) if lc.max_staleness > 0 else gen_s + train_s
    step = {
        "train_flops_per_token": train_flops_per_token(cfg),
        "decode_tokens_per_s_per_generator": rate["tokens_per_s"], "running_sequences": rate["running"],
        "mean_response_tokens": mean_len, "gen_s": gen_s, "train_s": train_s, "step_s": step_s,
        "steps_per_hour": 3600 / step_s, "bound": "generation" if gen_s >= train_s else "training",
        "generators_to_balance": math.ceil(max(1, gc_.num) * gen_s / train_s),
        "gpus": {"learner": lc.num_processes, "generators": gc_.num * gc_.tensor_parallel_size},
        "assumptions": {"prompt_tokens": prompt_tokens, "response_median": median, "response_sigma": RESPONSE_SIGMA,
                        "train_mfu": cost.train_mfu, "decode_bw_eff": cost.decode_bw_eff,
                        "schedule": "overlapped (max_staleness > 0)" if lc.max_staleness > 0 else "lock step"},
    }
    problems = []
    if not learner["fits"]:
        problems.append(f"learner rank needs {learner_peak / GB:.1f} GB of {device.memory_bytes / GB:.0f} GB "
                        f"(at most {1 - HEADROOM:.0%}); peak in {mem['peak_phase']}")
    if not generator["fits"]:
        problems.append(f"generator GPU needs {g['peak'] / GB:.1f} GB of {device.memory_bytes / GB:.0f} GB")
    if generator["sequences_at_max_len"] < 1:
        problems.append(f"the KV cache ({gc_.kv_cache_mb} MB) holds no sequence of max_model_len {gc_.max_model_len}")
    return {"gpu": device.name, "model": {"name": shape.name, "params": shape.params,
                                          "critic_params": shape.critic_params if setting.critic else 0},
            "learner": learner, "generator": generator, "step": step, "fits": not problems, "problems": problems}


def render(p: dict) -> str:
    """`orz plan`'s text: one line per figure."""
    lr, g, s = p["learner"], p["generator"], p["step"]
    st = lr["setting"]
    gb = lr["per_rank_gb"]
    lines = [f"model {p['model']['name']}: {p['model']['params'] / 1e9:.2f}B parameters; GPU {p['gpu']}",
             f"learner rank ({st['world']} FSDP2 ranks, {st['dtype']}, checkpointing "
             f"{'on' if st['checkpointing'] else 'off'}, logits "
             f"{'chunks of ' + str(st['chunk_tokens']) if st['chunk_tokens'] else 'full'}, micro-batch "
             f"{st['microbatch_tokens']:,} tokens of width {st['width']:,}):"]
    lines += [f"  {k:<16}{v:8.2f} GB" for k, v in gb.items() if k != "peak"]
    lines.append(f"  {'peak':<16}{gb['peak']:8.2f} GB in {lr['peak_phase']}: "
                 f"{'fits' if lr['fits'] else 'DOES NOT FIT'}, headroom {lr['headroom']:.0%} of "
                 f"{lr['memory_gb']:.0f} GB")
    pg = g["per_gpu_gb"]
    lines += [f"generator (TP {g['tensor_parallel']}): weights {pg['weights']:.2f} GB + KV cache {pg['kv_cache']:.2f} "
              f"GB + overhead {pg['overhead']:.2f} GB = {pg['peak']:.2f} GB per GPU: "
              f"{'fits' if g['fits'] else 'DOES NOT FIT'}, headroom {g['headroom']:.0%}",
              f"  KV cache: {g['kv_tokens']:,} tokens = {g['sequences_at_max_len']:,} sequences at max_model_len, "
              f"{g['sequences_at_mean_context']:,} at the mean context",
              f"step: generation {_secs(s['gen_s'])} on {s['gpus']['generators']} GPUs "
              f"({s['decode_tokens_per_s_per_generator']:,.0f} tokens/s per generator, "
              f"{s['running_sequences']} running), "
              f"training {_secs(s['train_s'])} on {s['gpus']['learner']} GPUs "
              f"({s['train_flops_per_token']['total']:.0f} FLOPs/param/token); step {_secs(s['step_s'])} "
              f"({s['steps_per_hour']:,.1f}/h, {s['bound']}-bound; generators that keep up with training: "
              f"{s['generators_to_balance']})",
              f"  assuming responses of mean {s['mean_response_tokens']:.0f} tokens (log-normal, median "
              f"{s['assumptions']['response_median']:.0f}), prompts of {s['assumptions']['prompt_tokens']}, "
              f"training at {s['assumptions']['train_mfu']:.0%} MFU"]
    lines.append("fits" if p["fits"] else "does not fit: " + "; ".join(p["problems"]))
    return "\n".join(lines)


def _secs(x: float) -> str:
    return f"{x:.0f} s" if x >= 10 else f"{x:.3g} s"


def host_memory() -> tuple[str, float, bool]:
    """(device, bytes the learner can use, is CUDA): the first GPU's free memory, else this host's RAM."""
    try:
        import torch

        if torch.cuda.is_available():
            device = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
            free, _total = torch.cuda.mem_get_info(device)
            return torch.cuda.get_device_name(device), float(free), True
    except ImportError:
        pass
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return "CPU", info["MemAvailable"] * 1024.0, False


def fit_warning(cfg: Config, device: str, available: float, cuda: bool) -> str | None:
    """A warning when the plan says one learner rank (on CPU: all of this host's ranks) needs more than
    `available` bytes; None when it fits or the model's shape is unknown."""
    try:
        shape = model_shape(cfg)
    except ValueError:
        return None
    need = rank_peak_bytes(learner_memory(shape, learner_setting(cfg, cuda=cuda)), cuda)
    ranks = 1 if cuda else cfg.learner.num_processes
    if need * ranks <= available:
        return None
    who = "a learner rank" if ranks == 1 else f"{ranks} learner ranks"
    return (f"orz plan predicts {who} will need {need * ranks / GB:.1f} GB, but {device} has {available / GB:.1f} GB "
            f"free: expect out-of-memory. Try learner.activation_checkpointing=true, learner.dtype=bfloat16, a smaller "
            f"learner.max_tokens_per_microbatch or more learner.num_processes (`orz plan` shows each term)")


def warn_if_it_will_not_fit(cfg: Config, log: logging.Logger) -> str | None:
    """`orz up` and `orz learner` at start: the plan against the memory found here (logged; the run goes on)."""
    device, available, cuda = host_memory()
    warning = fit_warning(cfg, device, available, cuda)
    if warning:
        log.warning(warning)
    return warning

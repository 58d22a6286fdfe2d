"""Cost models of GPU work, for the cluster-scale simulation (bench/simulate.py): how long a given GPU takes to
decode, prefill, train on and ship a given number of tokens, from the model's shapes and the GPU's spec sheet.

Decode is memory-bound (a roofline): one engine iteration reads the weights once and every running sequence's
KV cache once, at `decode_bw_eff` of the HBM bandwidth, plus a fixed per-iteration cost (scheduling, kernel
launches); it is never faster than its FLOPs at `decode_mfu`. The KV cache holds what the GPU memory left
after the weights can hold. Prefill and training are compute-bound at `prefill_mfu` / `train_mfu` of peak.
Training costs `train_flops_per_token` × params FLOPs per token: 6 (forward + backward of the actor), plus 6
(critic), plus 2 (the critic's value pass for GAE) for ORZ's PPO-GAE = 14; AReaL's decoupled PPO without a
critic: 6 + 2 (proximal log-prob pass) = 8.

Sources of the defaults (stated again in every simulation report):
- H100 SXM / H800 SXM: 989 TFLOP/s dense BF16, 3.35 TB/s HBM3, 80 GB (NVIDIA H100 datasheet).
- Model shapes from the models' Hugging Face config.json: Qwen2.5-7B (7.62 B params, 28 layers, 4 KV heads
  of dim 128), DeepSeek-R1-Distill-Qwen-1.5B (1.78 B params, 28 layers, 2 KV heads of dim 128).
- Efficiencies are assumptions, stated as such: decode reaches 70% of HBM bandwidth with 2 ms of fixed cost
  per iteration; prefill 50% and training 35% MFU (typical reported FSDP/Megatron MFU for 1.5–7B models).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class GpuSpec:
    name: str = "H100-SXM"
    peak_flops: float = 989e12  # dense BF16
    hbm_bytes_per_s: float = 3.35e12
    memory_bytes: float = 80e9


@dataclass(frozen=True)
class ModelSpec:
    name: str
    params: float
    layers: int
    kv_heads: int
    head_dim: int
    bytes_per_param: int = 2  # BF16

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_param  # K and V


QWEN25_7B = ModelSpec("Qwen2.5-7B", 7.62e9, 28, 4, 128)
R1_DISTILL_15B = ModelSpec("DeepSeek-R1-Distill-Qwen-1.5B", 1.78e9, 28, 2, 128)


@dataclass(frozen=True)
class CostModel:
    model: ModelSpec
    gpu: GpuSpec = GpuSpec()
    tp: int = 1  # GPUs per generator (tensor parallel)
    train_gpus: int = 16
    max_num_seqs: int = 256  # vLLM's cap on running sequences per engine
    decode_bw_eff: float = 0.70
    decode_fixed_s: float = 0.002
    decode_mfu: float = 0.5
    prefill_mfu: float = 0.5
    train_mfu: float = 0.35
    train_flops_per_token: float = 14.0  # ORZ's PPO-GAE; 8 without a critic
    gpu_memory_utilization: float = 0.9
    broadcast_bytes_per_s: float = 20e9  # NCCL broadcast over 8×400 Gb/s InfiniBand, effective (assumption)
    load_fixed_s: float = 0.5  # pause, copy into the engine, resume (assumption)
    grade_fixed_s: float = 0.05  # one reward-server round trip (bench/reward.py: p50 13 ms on 2 CPUs)
    grade_per_item_s: float = 0.0005
    kv_cache_bytes: float | None = None  # per GPU, as vLLM's kv_cache_memory_bytes; None: what memory leaves

    @property
    def kv_capacity_tokens(self) -> int:
        if self.kv_cache_bytes is not None:
            return int(self.kv_cache_bytes * self.tp / self.model.kv_bytes_per_token)
        free = self.gpu.memory_bytes * self.tp * self.gpu_memory_utilization - self.model.weight_bytes
        return int(free / self.model.kv_bytes_per_token)

    def decode_iteration_s(self, running: int, context_tokens: float) -> float:
        """One engine iteration: one new token for each of `running` sequences holding `context_tokens` in all."""
        mem = (self.model.weight_bytes + context_tokens * self.model.kv_bytes_per_token) / (
            self.tp * self.gpu.hbm_bytes_per_s * self.decode_bw_eff)
        compute = 2 * self.model.params * running / (self.tp * self.gpu.peak_flops * self.decode_mfu)
        return self.decode_fixed_s + max(mem, compute)

    def prefill_s(self, tokens: float) -> float:
        return 2 * self.model.params * tokens / (self.tp * self.gpu.peak_flops * self.prefill_mfu)

    def train_s(self, tokens: float, gpus: int | None = None) -> float:
        gpus = gpus or self.train_gpus
        return self.train_flops_per_token * self.model.params * tokens / (gpus * self.gpu.peak_flops * self.train_mfu)

    def broadcast_s(self) -> float:
        return self.model.weight_bytes / self.broadcast_bytes_per_s

    def load_s(self) -> float:
        return self.load_fixed_s + self.model.weight_bytes / (self.tp * self.gpu.hbm_bytes_per_s * self.decode_bw_eff)

    def steady_decode_rate(self, lengths: LengthModel, prompt_len: int, max_running: int | None = None) -> dict:
        """Tokens/s of one engine kept full, in closed form (what generator/sim_engine.py measures by stepping).

        A full engine runs B sequences: the fewest of `max_num_seqs`, `max_running` (the sequences the generator
        keeps in it) and what the KV cache holds at the mean context. Finished sequences are replaced at once,
        so a running sequence is seen at an age uniform over its length, length-biased: the mean context is
        prompt + E[L²] / (2 E[L]). Every new sequence prefills its prompt once, E[L] tokens later, so
        rate = B / (t_iteration(B, B × context) + B × t_prefill(prompt) / E[L])."""
        draws = lengths.sample(np.random.default_rng(0), 200_000).astype(np.float64)
        mean, second = float(draws.mean()), float((draws**2).mean())
        context = prompt_len + second / (2 * mean)
        running = min(self.max_num_seqs, max_running or self.max_num_seqs,
                      max(1, int(self.kv_capacity_tokens // context)))
        iteration = self.decode_iteration_s(running, running * context)
        rate = running / (iteration + running * self.prefill_s(prompt_len) / mean)
        return {"tokens_per_s": rate, "running": running, "mean_context": context, "iteration_s": iteration,
                "mean_response_tokens": mean}

    def grade_s(self, items: int) -> float:
        return self.grade_fixed_s + self.grade_per_item_s * items

    def describe(self) -> dict:
        d = asdict(self)
        d["kv_capacity_tokens"] = self.kv_capacity_tokens
        d["weight_gb"] = self.model.weight_bytes / 1e9
        d["broadcast_s"] = self.broadcast_s()
        d["load_s"] = self.load_s()
        d["decode_tok_s_at_256x2k"] = 256 / self.decode_iteration_s(256, 256 * 2048)
        return d


@dataclass(frozen=True)
class LengthModel:
    """Response lengths: log-normal (long right tail, as reasoning models' are), capped at `max_tokens`; a
    capped response is truncated (finish "length", reward 0)."""

    median: float
    sigma: float
    max_tokens: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        raw = rng.lognormal(math.log(self.median), self.sigma, n)
        return np.minimum(np.maximum(raw, 1), self.max_tokens).astype(np.int64)

    def mean(self, draws: int = 200_000) -> float:
        return float(self.sample(np.random.default_rng(0), draws).mean())

    def truncated_fraction(self, draws: int = 200_000) -> float:
        return float((self.sample(np.random.default_rng(0), draws) >= self.max_tokens).mean())

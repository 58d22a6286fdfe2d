"""Memory of a learner rank and of a generator, predicted from the config and the model's shape (`orz plan`).

Every term below is a tensor the learner holds, written as bytes per parameter or per token, from how the
code computes (learner/trainer.py, learner/logits.py, learner/parallel.py, Hugging Face's Qwen2 layers). They
are checked against measured peaks of real PPO iterations by bench/learner_memory.py.

Per rank, with W FSDP2 ranks, compute width b (2 for bf16, 4 for fp32), P parameters per model:
- persistent, for actor and critic each: fp32 master weights 4P/W, fp32 gradients 4P/W (kept between the
  optimiser steps: each step zeroes its model's gradients only when it starts), Adam moments 8P/W;
- while one model trains on a micro-batch of T padded tokens (rows × width):
  - FSDP's unsharded compute copies (sharded runs only): the root unit (embeddings, final norm, head)
    from the forward to the end of the backward, two decoder layers at a time (the one computing and the one
    prefetched), and one layer's unsharded gradients in width b and again in fp32 for the reduction;
  - saved activations per decoder layer and token: 6·h·b + 2·h·4 (the RMSNorms' fp32 copies) + 2·kv·b
    (keys and values; 2·q·b when a mask makes SDPA repeat them per head) + 4·i·b (the MLP) + 4·(n_h + 2)
    (softmax log-sum-exp, norm statistics); with activation checkpointing only each layer's input, h·b,
    plus one layer's full set while it is recomputed;
  - the attention mask (a float [rows, 1, width, width] when rows are padded): 4·T·width bytes; packed rows
    (learner.packing) get a block-diagonal [T × T] one instead (bool under SDPA), or none under flash-attention;
  - the backward's working set: gradients of the widest activations, T·(3·i + 4·h)·b;
  - the actor's head: with chunking, the response positions' hidden states and per chunk of C tokens a few
    [C × vocab] fp32 tensors, plus the head's fp32 weight gradient; without, the [T × vocab] logits, their
    fp32 log-softmax and its gradient;
- an optimiser step: AdamW's foreach update makes one temporary of its model's shard, 4P/W.
The peak is the persistent part plus the largest of the transient phases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder-only transformer, as in its Hugging Face config.json (Qwen2/Llama layout)."""

    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool = False
    head_dim: int | None = None

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.d

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.d

    @property
    def layer_params(self) -> int:
        h = self.hidden
        attn = h * self.q_dim + self.q_dim + 2 * (h * self.kv_dim + self.kv_dim) + self.q_dim * h  # q,k,v biases
        return attn + 3 * h * self.intermediate + 2 * h

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        """The causal LM: embeddings, layers, final norm, and an untied head."""
        head = 0 if self.tied else self.embed_params
        return self.embed_params + self.layers * self.layer_params + self.hidden + head

    @property
    def critic_params(self) -> int:
        """The critic: the same body without the LM head, plus a scalar value head."""
        return self.embed_params + self.layers * self.layer_params + self.hidden + self.hidden

    def kv_bytes_per_token(self, width: int = 2) -> int:
        return 2 * self.layers * self.kv_dim * width

    @classmethod
    def from_hf_config(cls, config: dict, name: str = "") -> ModelShape:
        return cls(name or config.get("_name_or_path", "") or config.get("model_type", "model"),
                   int(config["vocab_size"]), int(config["hidden_size"]), int(config["intermediate_size"]),
                   int(config["num_hidden_layers"]), int(config["num_attention_heads"]),
                   int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                   bool(config.get("tie_word_embeddings", False)), config.get("head_dim"))


# Shapes from the models' config.json on the Hugging Face hub (Qwen/Qwen2.5-*), for configs whose model
# directory is not on this machine.
QWEN25 = {
    "qwen2.5-0.5b": ModelShape("Qwen2.5-0.5B", 151936, 896, 4864, 24, 14, 2, tied=True),
    "qwen2.5-1.5b": ModelShape("Qwen2.5-1.5B", 151936, 1536, 8960, 28, 12, 2, tied=True),
    "qwen2.5-3b": ModelShape("Qwen2.5-3B", 151936, 2048, 11008, 36, 16, 2, tied=True),
    "qwen2.5-7b": ModelShape("Qwen2.5-7B", 152064, 3584, 18944, 28, 28, 4),
    "qwen2.5-14b": ModelShape("Qwen2.5-14B", 152064, 5120, 13824, 48, 40, 8),
    "qwen2.5-32b": ModelShape("Qwen2.5-32B", 152064, 5120, 27648, 64, 40, 8),
}


def shape_for(model_path: Path, override: str | None = None) -> ModelShape:
    """The model's shape: `override` (a QWEN25 key), else its config.json, else a QWEN25 entry whose name the
    directory's name carries (`/models/Qwen2.5-7B`)."""
    if override:
        if override.lower() not in QWEN25:
            raise ValueError(f"unknown model shape {override!r}; known: {', '.join(QWEN25)}")
        return QWEN25[override.lower()]
    config = Path(model_path) / "config.json"
    if config.is_file():
        return ModelShape.from_hf_config(json.loads(config.read_text()), Path(model_path).name)
    name = Path(model_path).name.lower()
    for key, shape in QWEN25.items():
        if name == key or name.endswith("-" + key.split("-", 1)[1]) and name.startswith("qwen2.5"):
            return shape
    raise ValueError(f"no config.json at {model_path} and its name names no known model; pass --model-shape "
                     f"({', '.join(QWEN25)})")


@dataclass(frozen=True)
class GpuMemory:
    name: str
    memory_bytes: float
    peak_bf16_flops: float
    hbm_bytes_per_s: float


# Spec sheets (dense BF16): H100 SXM 989 TFLOP/s, 3.35 TB/s, 80 GB; H200 989 TFLOP/s, 4.8 TB/s, 141 GB;
# A100 SXM 312 TFLOP/s, 2.04 TB/s, 80 GB.
GPUS = {
    "h100-80gb": GpuMemory("H100-80GB", 80e9, 989e12, 3.35e12),
    "h200-141gb": GpuMemory("H200-141GB", 141e9, 989e12, 4.8e12),
    "a100-80gb": GpuMemory("A100-80GB", 80e9, 312e12, 2.04e12),
}


@dataclass(frozen=True)
class LearnerSetting:
    """What a learner rank's memory depends on."""

    world: int = 1  # FSDP2 ranks
    dtype: str = "float32"  # compute: bfloat16 or float32
    checkpointing: bool = False
    chunk_tokens: int = 2048  # 0: full logits
    microbatch_tokens: int = 16384  # padded tokens (rows × width) of a micro-batch
    width: int = 512  # the longest sequence (prompt + response) of a micro-batch
    response_fraction: float = 1.0  # share of a micro-batch's tokens that are response tokens (logits)
    critic: bool = True
    reference: bool = False
    padded: bool = True  # rows of different lengths: a padding mask (and SDPA repeats keys and values per head)
    entropy: bool = False  # learner.entropy_coef > 0: the entropy's softmax is kept per chunk too
    packed: bool = False  # learner.packing: one padding-free row per micro-batch (microbatch_tokens real tokens)
    attention: str = "sdpa"  # learner.attn_implementation

    @property
    def b(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4

    @property
    def sharded(self) -> bool:
        return self.world > 1 or self.dtype == "bfloat16"


def _masked(st: LearnerSetting) -> bool:
    """Attention runs with a mask: padded rows, or packed rows outside flash-attention's varlen kernels."""
    return st.padded or (st.packed and st.attention != "flash_attention_2")


def _mask_bytes(st: LearnerSetting) -> float:
    t = float(st.microbatch_tokens)
    if st.packed:  # a block-diagonal [tokens × tokens] mask: bool for sdpa, the compute dtype for eager
        return 0.0 if st.attention == "flash_attention_2" else t * t * (st.b if st.attention == "eager" else 1)
    return 4.0 * t * st.width if st.padded else 0.0  # a float [rows, 1, width, width] mask


def _layer_activation_bytes(s: ModelShape, st: LearnerSetting) -> float:
    """Saved activations of one decoder layer, per token."""
    b, h = st.b, s.hidden
    kv = s.q_dim if _masked(st) else s.kv_dim
    return 6 * h * b + 2 * h * 4 + 2 * kv * b + 4 * s.intermediate * b + 4 * (s.heads + 2)


def learner_memory(s: ModelShape, st: LearnerSetting) -> dict[str, float]:
    """Bytes per learner rank: each term, the phases' transient sums, and the peak."""
    w, b, h, t = st.world, st.b, s.hidden, st.microbatch_tokens
    models = {"actor": s.params, **({"critic": s.critic_params} if st.critic else {})}
    out: dict[str, float] = {}
    t = float(t)
    out["params"] = sum(4 * p / w for p in models.values()) + (4 * s.params / w if st.reference else 0)
    out["grads"] = sum(4 * p / w for p in models.values())
    out["optimizer"] = sum(8 * p / w for p in models.values())
    layer = _layer_activation_bytes(s, st)
    # Saved through the backward pass: every layer's activations, or with checkpointing each layer's input.
    saved = s.layers * t * (h * b if st.checkpointing else layer)
    saved += t * h * (4 + 2 * b) + 2 * t * s.d * b  # the final norm and its output; rotary cos/sin
    mask = _mask_bytes(st)
    # The backward pass goes through the head first, then the layers: their working sets do not coexist.
    layer_work = (t * layer if st.checkpointing else 0.0) + t * (3 * s.intermediate + 4 * h) * b
    resp = t * st.response_fraction
    if st.chunk_tokens > 0:
        c = min(st.chunk_tokens, resp)
        # fp32 logits worked on in place; the softmax beside them for the entropy; a bf16 matmul output or
        # gradient beside the fp32 one; the head's fp32 weight gradient (and its cast)
        head_saved = resp * h * b
        head_work = c * s.vocab * (4 + (4 if st.entropy else 0) + (2 if b == 2 else 0)) + \
            s.vocab * h * (4 + (b if b != 4 else 0))
    else:  # the logits, their fp32 log-softmax (saved), and its gradient
        head_saved = t * s.vocab * 4
        head_work = t * s.vocab * (b + 4)
    out.update(activations=saved, attention_mask=mask, logits=head_saved + head_work, layer_backward=layer_work)
    unsharded = {}
    for name, p in models.items():
        root = p - s.layers * s.layer_params
        unsharded[name] = (root * b + 2 * s.layer_params * b + s.layer_params * (b + 4)) if st.sharded else 0.0
    out["fsdp_unsharded"] = max(unsharded.values())
    persistent = out["params"] + out["grads"] + out["optimizer"]
    phases = {
        "actor_train": unsharded["actor"] + saved + mask + head_saved + max(head_work, layer_work),
        "optimizer_step": max(4 * p / w for p in models.values()),
    }
    if st.critic:
        phases["critic_train"] = unsharded["critic"] + saved + mask + layer_work + t * 8
    out["persistent"] = persistent
    out.update({f"phase_{k}": v for k, v in phases.items()})
    out["peak_phase"] = max(phases, key=phases.get)  # type: ignore[arg-type]
    out["peak"] = persistent + max(phases.values())
    return out


def generator_memory(s: ModelShape, gpu: GpuMemory, tp: int, kv_cache_bytes: float, max_model_len: int,
                     mean_context: float, weight_width: int = 2, overhead_bytes: float = 2e9) -> dict[str, float]:
    """Per generator GPU: weights (tensor-parallel share), the configured KV cache, and vLLM's own activations and
    CUDA graphs (`overhead_bytes`, an assumption); the sequences the KV cache holds at full length and at the
    mean context."""
    weights = s.params * weight_width / tp
    tokens = kv_cache_bytes * tp / s.kv_bytes_per_token(weight_width)
    used = weights + kv_cache_bytes + overhead_bytes
    return {"weights": weights, "kv_cache": kv_cache_bytes, "overhead": overhead_bytes, "peak": used,
            "kv_tokens": tokens, "sequences_at_max_len": tokens / max_model_len,
            "sequences_at_mean_context": tokens / max(1.0, mean_context), "headroom": 1 - used / gpu.memory_bytes}

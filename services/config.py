"""One YAML file configures every process: its sections and keys, their defaults and allowed values.
Loading (YAML, `ORZ__SECTION__KEY` environment variables, flags) and error messages: services/config_io.py.

Shared by all processes (services/ imports none of the process packages). Defaults follow ORZ
(playground/orz_7b_ppo.py; docs/recipes.md, "ORZ's settings, and ours"): γ = λ = 1, ε = 0.2, value clip 0.2,
grad clip 1.0, no KL, AdamW β = (0.9, 0.95), actor lr 1e-6, critic lr 5e-6, 12 critic steps per
iteration, temperature 1.0, stop at `</answer>`. `configs/tiny.yaml` scales them to a CPU-sized run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from services.config_base import _Section
from services.config_data import DataFormat, SourceConfig, TaskConfig  # noqa: F401 (importable from here too)

ENV_PREFIX = "ORZ__"


class ModelConfig(_Section):
    base_path: str = Field("~/.cache/orz/tiny-arith-base", description="HF-format base model directory")
    vocab_size: int = Field(384, description="tokenizer vocabulary built by make-base-model", ge=1)
    hidden_size: int = Field(128, description="tiny base model: hidden size", ge=1)
    intermediate_size: int = Field(384, description="tiny base model: MLP size", ge=1)
    num_layers: int = Field(3, description="tiny base model: transformer layers", ge=1)
    num_heads: int = Field(2, description="tiny base model: attention heads", ge=1)
    num_kv_heads: int = Field(1, description="tiny base model: key/value heads (GQA)", ge=1)
    pretrain_steps: int = Field(1000, description="supervised steps on the toy task's mixed guess/worked traces", ge=0)
    pretrain_batch: int = Field(64, description="sequences per pretraining step", ge=1)
    pretrain_lr: float = Field(3e-3, description="peak pretraining learning rate (cosine decay)", gt=0)
    skill_work_prob: float = Field(
        0.5, ge=0, le=1,
        description="fraction of worked traces (the rest guess) in pretraining, before the last prior_steps")
    work_prob: float = Field(
        0.15, description="fraction of worked traces in the last prior_steps: the base model's prior to work a "
        "problem out rather than guess", ge=0, le=1)
    prior_steps: int = Field(200, description="last pretraining steps, on the work_prob mix", ge=0)
    seed: int = Field(0, description="seed of the model build")

    @property
    def path(self) -> Path:
        return Path(os.path.expanduser(self.base_path))


class SamplingConfig(_Section):
    temperature: float = Field(1.0, gt=0, le=10,
        description="ORZ: 1.0; learner log-probs are of softmax(logits / temperature)")
    top_p: float = Field(1.0, description="ORZ: 1.0; training needs 1 (the learner recomputes log-probs of the whole "
                         "tempered distribution)", gt=0, le=1)
    max_tokens: int = Field(64, description="response token cap; longer responses are truncated and get reward 0", ge=1)
    stop: list[str] = Field(default_factory=lambda: ["</answer>"], description="stop strings, kept in the output (ORZ)")


class RedisConfig(_Section):
    url: str | None = Field(None, description="redis://host:port/db; null starts an embedded redis-server")
    claim_idle_ms: int = Field(60_000, description="pending entries idle this long are reclaimed (XAUTOCLAIM)", ge=1)
    reclaim_every_s: float = Field(5.0, gt=0, description="how often a generator looks for entries to reclaim "
                                   "(at most claim_idle_ms / 2); each look scans the whole pending list")
    block_ms: int = Field(1000, description="XREADGROUP block time", ge=1)
    socket_timeout_s: float = Field(10.0, gt=0, description="timeout of every Redis call")
    retry_s: float = Field(60.0, ge=0, description="a call that fails on a lost connection (Redis restarting) is "
                           "retried with jittered exponential backoff (capped at 2 s) for this long, then the "
                           "process exits")
    username: str | None = Field(None, description="ACL user (null: the default user)")
    password: str | None = Field(None, description="password of the ACL user (set ORZ__REDIS__PASSWORD from a "
                                 "Secret rather than writing it here)")
    tls: bool = Field(False, description="connect with TLS (as a rediss:// url does)")
    tls_ca_file: str | None = Field(None, description="CA bundle that signed the server's certificate")
    tls_cert_file: str | None = Field(None, description="client certificate, when the server asks for one "
                                      "(tls-auth-clients)")
    tls_key_file: str | None = Field(None, description="key of the client certificate")


class RewardConfig(_Section):
    url: str | None = Field(None, description="reward server base URL, or several replicas comma-separated; "
                            "`orz up` fills it in")
    host: str = Field("127.0.0.1", description="reward server bind address (`orz reward-server --host`; 0.0.0.0 in "
                      "containers)")
    port: int = Field(8600, description="reward server port (`--port`; `orz up` picks a free one)", ge=0, le=65535)
    workers: int = Field(1, description="uvicorn worker processes (`orz reward-server --workers`); each has its own "
                         "grading pool; metrics are aggregated across them", ge=1)
    grader_procs: int = Field(2, description="grading worker processes per uvicorn worker (`--grader-procs`)", ge=1)
    math_fallback_boxed: bool = Field(
        False, description="math: without a boxed answer inside <answer>…</answer> (ORZ: reward 0), grade the last "
        "\\boxed{} anywhere")
    grade_timeout_s: float = Field(5.0, description="wall-clock limit per item; the worker is killed past it", gt=0)
    worker_mem_mb: int = Field(2048, description="RLIMIT_AS per grading worker", ge=64)
    max_items: int = Field(1024, description="items per /v1/grade request", ge=1)
    max_response_chars: int = Field(1_048_576, description="characters per response (extraction is linear in it)", ge=1)
    max_request_mb: int = Field(64, description="request body cap (413 past it), whatever the item limits allow", ge=1)
    max_reference_chars: int = Field(10_000, description="characters per reference answer", ge=1)
    request_timeout_s: float = Field(60.0, gt=0, description="client-side HTTP timeout: a replica that does not "
                                     "answer within it is marked down and the batch goes to the next")
    retry_s: float = Field(300.0, ge=0, description="how long a generator keeps retrying a batch while no reward "
                           "server answers (exponential backoff with jitter, capped at 10 s); then it exits, its "
                           "prompts stay pending and a peer takes them over")
    token: str | None = Field(None, description="bearer token required when set")


class GeneratorConfig(_Section):
    num: int = Field(2, description="generators started by `orz up`", ge=0)
    backend: Literal["vllm", "transformers"] = Field(
        "vllm", description="inference engine: vllm (the default and tested path), or the plain transformers "
        "fallback for platforms vLLM lacks (slower; static batches)")
    prompts_per_batch: int = Field(8, description="most prompts taken from the queue per read", ge=1)
    max_inflight_requests: int = Field(16, description="prompts in the engine at once (continuous batching)", ge=1)
    dtype: str = Field("float32", description="engine dtype (float32 on CPU: no avx512_bf16 here)")
    kv_cache_mb: int = Field(64, description="vLLM KV-cache size", ge=1)
    max_model_len: int = Field(256, description="prompt + response token limit of the engine", ge=2)
    threads: int = Field(1, description="CPU threads per engine", ge=1)
    max_num_seqs: int = Field(256, description="transformers backend: most samples decoded together in one batch", ge=1)
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs per generator (tensor parallel)")
    seed: int = Field(0, description="engine seed (the process id is added)")
    engine_queue_samples: int | None = Field(
        None, ge=1, description="at most this many samples wait for engine slots beyond the running batch; the "
        "rest of the generator's prompts wait unstamped, so a prompt's version is the one it starts under (long "
        "generations: bench/simulate.py's AReaL setting sets n_samples). Unset: every ready prompt goes in at once")
    weight_wait_s: float = Field(
        5.0, description="longest wait for the weights of a prompt's feed version before sampling it anyway", ge=0)
    weight_update_mode: Literal["keep", "abort"] = Field(
        "keep", description="requests in flight at a weight update: keep decoding (PipelineRL) or abort and resample "
        "(AReaL)")
    heartbeat_s: float = Field(2.0, description="generator heartbeat period in Redis; 3 missed beats drop it from "
                               "the weight-sync group", gt=0)
    metrics_port: int = Field(0, description="/metrics and /healthz port; 0 picks a free port", ge=0, le=65535)
    metrics_host: str = Field("127.0.0.1", description="/metrics and /healthz bind address (0.0.0.0 in containers)")


class LearnerConfig(_Section):
    total_steps: int = Field(40, description="learner steps (policy versions) of the run", ge=1)
    batch_prompts: int = Field(16, description="prompts (trajectory groups) per step; ORZ: 128", ge=1)
    n_samples: int = Field(8, description="samples per prompt; ORZ: 64", ge=1)
    max_staleness: int = Field(1, description="groups sampled more than this many versions ago are dropped", ge=0)
    max_inflight_prompts: int | None = Field(
        None, ge=1, description="default batch_prompts × (max_staleness + 1) (AReaL's admission rule)")
    advantage: Literal["gae", "grpo", "rloo"] = Field(
        "gae", description="advantage estimator: gae (ORZ, with a critic), grpo (group mean/std), rloo (leave-one-out)")
    grpo_scale_by_std: bool = Field(True, description="grpo: divide by the group's std (false: Dr. GRPO)")
    gamma: float = Field(1.0, description="GAE discount (ORZ: 1)", ge=0, le=1)
    lam: float = Field(1.0, description="GAE λ (ORZ: 1)", ge=0, le=1)
    normalize_advantages: bool = Field(True, description="batch-level advantage whitening (ORZ)")
    clip_eps: float = Field(0.2, description="PPO ratio clip ε: the shorthand for both edges", gt=0)
    clip_eps_low: float | None = Field(
        None, gt=0, lt=1, description="lower clip edge: the ratio is clipped to [1 − clip_eps_low, 1 + "
        "clip_eps_high]; unset: clip_eps")
    clip_eps_high: float | None = Field(
        None, gt=0, description="upper clip edge (DAPO's clip-higher: 0.28); unset: clip_eps")
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        "token_mean", description="policy loss over tokens: token_mean (ORZ, DAPO), seq_mean_token_mean (GRPO: "
        "each sequence weighs the same), seq_mean_token_sum_norm (Dr. GRPO: token sums / sampling.max_tokens)")
    overlong_buffer_tokens: int = Field(
        0, ge=0, description="DAPO's soft overlong punishment: a response in the last this many tokens before "
        "sampling.max_tokens loses overlong_penalty × its depth into them / this, linearly; 0: off")
    overlong_penalty: float = Field(1.0, ge=0, description="the whole overlong penalty, at sampling.max_tokens")
    mask_truncated: bool = Field(
        False, description="leave samples that hit sampling.max_tokens out of the policy loss (DAPO's overlong "
        "filtering); the critic still trains on them")
    value_clip: float = Field(0.2, description="value clip ε_v", gt=0)
    is_cap: float = Field(2.0, description="truncation c of the importance weight π_prox/μ", ge=1)
    is_correction: Literal["none", "token", "sequence"] = Field(
        "token", description="importance weight min(π_prox/μ, is_cap) per token, one per sample (product of its token "
        "ratios), or none: ORZ's PPO loss exactly (right at max_staleness 0)")
    is_mode: Literal["truncate", "mask"] = Field(
        "truncate", description="truncate: cap the importance weight at is_cap; mask: drop the tokens (or, with "
        "is_correction sequence, the samples: geometric mean of the token ratios) whose weight is outside "
        "[is_low, is_high] from the policy loss")
    is_level: Literal["token", "sequence"] | None = Field(
        None, description="level of the importance weight in either is_mode: per token, or one per sample "
        "(truncate: the product of its token ratios; mask: their geometric mean, GSPO-style); unset: "
        "is_correction's. Needs is_correction token or sequence")
    is_low: float | None = Field(None, gt=0, description="is_mode mask: lowest weight kept (unset: 1 / is_high)")
    is_high: float | None = Field(None, gt=0, description="is_mode mask: highest weight kept (unset: is_cap)")
    filter_groups: Literal["none", "zero_variance"] = Field(
        "none", description="zero_variance: a group whose samples all have the same reward is not trained on "
        "(DAPO's dynamic sampling; counted as filtered); more prompts are fed so batches stay full")
    max_oversample: int | None = Field(
        None, ge=1, description="groups a step may filter before it trains on what it has (a short batch, "
        "logged and counted); unset: 4 × batch_prompts")
    kl_coef: float = Field(
        0.0, description="weight of a k3 KL(π_θ‖π_base) loss term (ORZ: 0; > 0 loads a reference model)", ge=0)
    entropy_coef: float = Field(0.0, description="weight of an entropy bonus (ORZ: 0)", ge=0)
    max_tokens_per_microbatch: int = Field(
        16384, ge=1,
        description="padded tokens per micro-batch (rows sorted by length); gradients accumulate to the batch")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="compute precision of actor and critic: bfloat16 (FSDP2 mixed precision: bf16 compute, "
        "fp32 master weights, optimiser states and gradient reduction, also on one process) or float32; auto: "
        "bfloat16 on CUDA, float32 on CPU")
    activation_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward pass (actor and critic)")
    logits_chunk_tokens: int = Field(
        2048, description="response positions whose logits exist at once (log-probs and entropy from the final "
        "hidden states, chunked in forward and backward); 0: the full logits of a micro-batch", ge=0)
    packing: bool = Field(
        False, description="run each micro-batch as one padding-free row, position ids restarting per sequence; pays "
        "with attn_implementation flash_attention_2 (varlen kernels); sdpa and eager build a [tokens × tokens] mask")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="attention kernels of actor, critic and reference (transformers' attn_implementation; "
        "flash_attention_2 needs the flash-attn package and a GPU)")
    checkpoint_every: int = Field(0, ge=0,
        description="write a resumable checkpoint every this many steps (0: final only)")
    keep_checkpoints: int = Field(2, description="step checkpoints kept on disk (oldest removed first)", ge=1)
    actor_lr: float = Field(1e-6, description="policy learning rate (ORZ 7B: 1e-6)", gt=0)
    critic_lr: float = Field(5e-6, description="critic learning rate (ORZ 7B: 5e-6)", gt=0)
    warmup_steps: int = Field(50, description="linear warm-up over this many optimiser steps of each model, then "
                              "constant (ORZ: 50)", ge=0)
    lr_decay_iterations: int = Field(0, description="after the warm-up, decay both learning rates linearly over "
                                     "this many iterations (0: constant; ORZ-32B's annealing stage: 100)", ge=0)
    lr_final_fraction: float = Field(1.0, description="the learning rates' share left at the end of the decay "
                                     "(ORZ-32B's annealing: 0.3, 1e-6 to 3e-7)", ge=0, le=1)
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    weight_decay: float = Field(0.0, description="AdamW weight decay (ORZ: 0)", ge=0)
    grad_clip: float = Field(1.0, description="gradient norm clip", gt=0)
    policy_steps_per_iter: int = Field(1, description="actor optimiser steps per batch (ORZ: 1)", ge=1)
    critic_steps_per_iter: int = Field(12, description="critic optimiser steps per batch (ORZ: 12)", ge=1)
    step_over: Literal["minibatches", "batch"] = Field(
        "minibatches", description="what each of the policy and critic optimiser steps covers: minibatches (ORZ: "
        "the batch shuffled into that many mini-batches balanced by tokens, one pass in all) or batch (every step "
        "over the whole batch: an epoch each)")
    seed: int = Field(0, description="learner seed")
    num_processes: int = Field(
        1, ge=1,
        description="data-parallel learner ranks `orz up` starts with torchrun (FSDP2; gloo on CPU, nccl on GPU)")
    threads: int = Field(1, description="torch CPU threads (per rank)", ge=1)
    metrics_port: int = Field(0, description="/metrics and /healthz port; 0 picks a free port", ge=0, le=65535)
    metrics_host: str = Field("127.0.0.1", description="/metrics and /healthz bind address (0.0.0.0 in containers)")
    wait_timeout_s: float = Field(600.0, description="give up if no trajectory arrives for this long", gt=0)
    eval_every: int = Field(0, description="evaluate the policy every this many steps (0: never), recorded as "
                            "eval_accuracy in metrics.jsonl and orz_learner_eval_accuracy", ge=0)
    eval_bench: str = Field("", description="in-training evaluation set: empty for the toy task's held-out "
                            "problems, or a benchmark of data/ (math500, gsm8k, …)")
    eval_size: int = Field(64, description="problems of the in-training evaluation set", ge=1)

    def compute_dtype(self, cuda: bool) -> str:
        """`dtype` resolved for a learner with (`cuda`) or without a GPU."""
        return ("bfloat16" if cuda else "float32") if self.dtype == "auto" else self.dtype

    @property
    def clip_edges(self) -> tuple[float, float]:
        """(ε_low, ε_high): the ratio is clipped to [1 − ε_low, 1 + ε_high]."""
        return (self.clip_eps if self.clip_eps_low is None else self.clip_eps_low,
                self.clip_eps if self.clip_eps_high is None else self.clip_eps_high)

    @property
    def is_weight(self) -> str:
        """The importance weight the loss applies: none, token or sequence (`is_level` over `is_correction`)."""
        return "none" if self.is_correction == "none" else (self.is_level or self.is_correction)


class WeightSyncConfig(_Section):
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl with CUDA, else gloo")
    host: str = Field("127.0.0.1", description="address generators use to reach the learner")
    port: int = Field(0, description="rendezvous port; 0 lets the learner pick a free one per group, else groups "
                      "cycle through port … port + port_span − 1", ge=0, le=65535)
    port_span: int = Field(16, ge=2, description="ports a fixed `port` cycles through, one per new group")
    socket_ifname: str = Field(
        "", description="network interface for weight sync (sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME unless "
        "already set); empty: gloo uses the interface on the route to the learner, NCCL its own choice")
    bucket_mb: int = Field(512, description="flat broadcast bucket size (bench/weight_sync.py: 512 beat 64–256)", ge=1)
    gloo_threads: int = Field(
        2, ge=1, le=8, description="gloo transport threads (devices) per member, each a full mesh; consecutive "
        "buckets go out on different ones, so two are on the wire at once (bench/weight_sync.py). NCCL ignores it")
    timeout_s: float = Field(
        60.0, gt=0,
        description="forming a group and each collective; a member that neither joins nor answers is dropped")
    slow_broadcast_s: float = Field(
        1.0, description="a broadcast slower than this times each member's link (a 64 KiB round trip, one member "
        "at a time); 0: never", ge=0)
    slow_peer_factor: float = Field(
        8.0, gt=1, description="a member whose round trip is over this many times the fastest member's (and over "
        "0.1 s) is left out of weight sync for slow_peer_cooldown_s, so one slow link does not hold back every step")
    slow_peer_cooldown_s: float = Field(
        120.0, description="how long a slow member is left out; doubles each time the same member is, up to 8×", ge=0)


class StackConfig(_Section):
    restart: Literal["on-failure", "never"] = Field(
        "on-failure", description="orz up restarts a child that dies (generator, reward server, embedded Redis "
        "from its AOF, the learner with --resume), or ends the run")
    max_restarts: int = Field(5, description="restarts per child before orz up gives up", ge=0)
    restart_backoff_s: float = Field(1.0, description="wait before a child's first restart; doubles each time", ge=0)
    restart_backoff_max_s: float = Field(30.0, description="longest wait between restarts", ge=0)


SINKS = ("jsonl", "tensorboard", "wandb", "mlflow")


class LoggingConfig(_Section):
    format: Literal["text", "json"] = Field(
        "text", description="one line per record: text (newlines escaped off a terminal) or JSON for log shippers")
    sinks: list[Literal[SINKS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["jsonl"], description="experiment trackers every step's scalars, in-training "
        "eval and sample completions go to: any of " + ", ".join(SINKS) + " (jsonl, metrics.jsonl, is always on; "
        "docs/tracking.md)")
    samples_per_step: int = Field(4, ge=0, description="sample completions logged per step (a text table in "
                                  "tensorboard, wandb and mlflow; samples.jsonl)")
    sample_chars: int = Field(2000, ge=16, description="longest prompt or completion text logged with a sample")
    tensorboard_dir: str | None = Field(None, description="event files (null: <run_dir>/<run_name>/tensorboard)")
    wandb_project: str = Field("orz-async", description="W&B project")
    wandb_entity: str | None = Field(None, description="W&B entity (team or user; null: the key's default)")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline writes <run_dir>/<run_name>/wandb for `wandb sync`; online needs "
        "WANDB_API_KEY in the environment")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking server or database (null: "
                                            "sqlite:///<run_dir>/<run_name>/mlflow.db, artifacts beside it)")
    mlflow_experiment: str = Field("orz-async", description="MLflow experiment name (created when missing)")

    @model_validator(mode="after")
    def _jsonl_always(self) -> LoggingConfig:
        if "jsonl" not in self.sinks:
            self.sinks = ["jsonl", *self.sinks]
        if len(set(self.sinks)) != len(self.sinks):
            raise ValueError(f"logging.sinks lists a sink twice: {self.sinks}")
        return self


class EvalConfig(_Section):
    temperature: float = Field(1.0, ge=0, le=10,
        description="ORZ reports accuracy averaged over samples at temperature 1")
    samples: int = Field(4, description="samples per held-out problem (avg@k)", ge=1)
    max_tokens: int = Field(64, description="response token cap during evaluation", ge=1)


class Config(_Section):
    run_name: str = Field("tiny", description="names the run directory and the Redis namespace orz:<run_name>")
    run_dir: str = Field("runs", description="metrics, plots, logs and checkpoints go to <run_dir>/<run_name>")
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    stack: StackConfig = Field(default_factory=StackConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _check(self) -> Config:
        problems = []
        lc, gc = self.learner, self.generator
        if lc.max_inflight_prompts is not None and lc.max_inflight_prompts < lc.batch_prompts:
            problems.append(f"learner.max_inflight_prompts ({lc.max_inflight_prompts}) is below learner.batch_prompts "
                            f"({lc.batch_prompts}): the feeder would never have a batch in flight")
        if lc.batch_prompts < lc.num_processes:
            problems.append(f"learner.batch_prompts ({lc.batch_prompts}) is below learner.num_processes "
                            f"({lc.num_processes}): a data-parallel rank would get no group")
        for key, tokens in (("sampling.max_tokens", self.sampling.max_tokens),
                            ("eval.max_tokens", self.eval.max_tokens)):
            if tokens >= gc.max_model_len:
                problems.append(f"{key} ({tokens}) leaves no room for a prompt in generator.max_model_len "
                                f"({gc.max_model_len})")
        if self.redis.block_ms >= self.redis.socket_timeout_s * 1000:
            problems.append(f"redis.block_ms ({self.redis.block_ms}) must be below redis.socket_timeout_s "
                            f"({self.redis.socket_timeout_s} s), or a blocking read times out its own socket")
        if self.sampling.top_p < 1.0:
            problems.append(f"sampling.top_p ({self.sampling.top_p}) must be 1 for training: the learner's log-probs "
                            "are of the whole tempered distribution, and a nucleus would make vLLM's differ from them")
        if lc.is_level is not None and lc.is_correction == "none":
            problems.append(f"learner.is_level ({lc.is_level}) needs an importance weight: is_correction is none")
        if lc.is_mode == "mask" and (lc.is_low or 0) >= (lc.is_high or lc.is_cap):
            problems.append(f"learner.is_low ({lc.is_low}) must be below learner.is_high "
                            f"({lc.is_high or lc.is_cap})")
        if lc.overlong_buffer_tokens > self.sampling.max_tokens:
            problems.append(f"learner.overlong_buffer_tokens ({lc.overlong_buffer_tokens}) exceeds "
                            f"sampling.max_tokens ({self.sampling.max_tokens})")
        if self.task.max_terms < self.task.min_terms:
            problems.append(f"task.max_terms ({self.task.max_terms}) is below task.min_terms ({self.task.min_terms})")
        ws = self.weight_sync
        if ws.port and ws.port + ws.port_span - 1 > 65535:
            problems.append(f"weight_sync.port + port_span - 1 ({ws.port + ws.port_span - 1}) is past 65535")
        if not all(0 <= b < 1 for b in lc.betas):
            problems.append(f"learner.betas must each be in [0, 1), got {list(lc.betas)}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def namespace(self) -> str:
        return f"orz:{self.run_name}"

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) / self.run_name

    @property
    def max_inflight_prompts(self) -> int:
        lc = self.learner
        return lc.max_inflight_prompts or lc.batch_prompts * (lc.max_staleness + 1)


class ConfigError(ValueError):
    """The configuration cannot run: every problem found, one per line, each naming its key."""

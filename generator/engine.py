"""The generator's inference engine: vLLM (CPU build here, CUDA build on GPUs; one code path).

Settings for vLLM's CPU build: float32 (no avx512_bf16 on these CPUs), `enforce_eager`, an
explicit KV-cache size (vLLM's NUMA check otherwise refuses to start), the in-process engine
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`: 3 s start instead of 20+, and the worker is reachable for in-place
weight loads). New weights go in through the worker's `reload_weights` (restores the repacked oneDNN
layout, loads HF-named tensors, re-runs post-load processing); the prefix cache is reset afterwards
because cached KV was computed with the old weights.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from generator.engine_api import Completion
from services.protocol import SamplingParams

log = logging.getLogger("orz.generator.engine")
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class RotaryReloadFilter(logging.Filter):
    """Drops exactly vLLM's "RotaryEmbedding: Failed to load weights" warning, printed on every weight reload.

    It is harmless. vLLM's layerwise reload counts a layer's parameters *and buffers* as loadable; a
    RotaryEmbedding has no parameters, only its `cos_sin_cache` buffer, computed from the model config's
    rope_theta at construction and never in a checkpoint. So no tensor of it is ever loaded, vLLM warns,
    then puts the original buffer back (`_place_kernel_tensors`), which is the right cache. The engine
    test checks log-probs against the transformers model after in-flight swaps, to 1e-4. The same warning
    for any other layer (a parameter missing from the weights) still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",))


logging.getLogger(RELOAD_LOGGER).addFilter(RotaryReloadFilter())




def _prepare_environment(threads: int) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # Several engines share a small CPU: let each use `threads` threads without pinning them all to the
    # same cores (vLLM's default "auto" bind reserves a core per engine).
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)


class VllmEngine:
    def __init__(self, model_path: str | Path, *, dtype: str = "float32", max_model_len: int = 256,
                 kv_cache_mb: int = 64, seed: int = 0, threads: int = 1, tensor_parallel_size: int = 1) -> None:
        _prepare_environment(threads)
        from vllm import LLM  # imported late: 8–11 s, and only generator processes need it

        t0 = time.time()
        self.llm = LLM(
            model=str(model_path), dtype=dtype, max_model_len=max_model_len, enforce_eager=True,
            kv_cache_memory_bytes=kv_cache_mb * 2**20, seed=seed, enable_prefix_caching=True,
            # log-probs of the distribution sampled (after temperature), which the learner recomputes
            logprobs_mode="processed_logprobs",
            tensor_parallel_size=tensor_parallel_size,
        )
        log.info("vLLM engine up in %.1f s (%s)", time.time() - t0, model_path)

    def generate(self, prompt_ids: list[list[int]], params: list[SamplingParams],
                 n: list[int]) -> list[list[Completion]]:
        """Sample `n[i]` completions of `prompt_ids[i]` with `params[i]`; one engine call, continuously batched."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        vparams = [
            VSamplingParams(
                n=k, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens, stop=list(p.stop),
                include_stop_str_in_output=True, logprobs=0, detokenize=True,
            )
            for p, k in zip(params, n)
        ]
        outputs = self.llm.generate(prompts, vparams, use_tqdm=False)
        result: list[list[Completion]] = []
        for out in outputs:
            result.append([self._completion(c) for c in out.outputs])
        return result

    # --- continuous batching: requests enter and leave the running engine one by one -------------------

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, n: int) -> None:
        """Adds one prompt (`n` samples) to the running engine; its result comes back from `step()`."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        vparams = VSamplingParams(
            n=n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
            stop=list(params.stop), include_stop_str_in_output=True, logprobs=0, detokenize=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        from vllm.exceptions import VLLMValidationError

        try:
            self.llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(prompt_ids)), vparams)
        except VLLMValidationError as exc:  # a prompt vLLM will not take (a token id past the vocabulary, …)
            raise ValueError(f"request {request_id}: {exc}") from None

    def step(self) -> list[tuple[str, list[Completion]]]:
        """One engine step; returns the requests that finished in it."""
        done = []
        for out in self.llm.llm_engine.step():
            if out.finished:
                done.append((out.request_id, [self._completion(c) for c in out.outputs]))
        return done

    def has_unfinished(self) -> bool:
        return self.llm.llm_engine.has_unfinished_requests()

    def queued(self) -> int | None:
        """From vLLM's scheduler: its child requests (one per sample) waiting and running, beyond max_num_seqs.
        Reachable with the engine core in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set above), else None."""
        try:
            sched = self.llm.llm_engine.engine_core.engine_core.scheduler
            slots = self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        except AttributeError:
            return None
        return max(0, len(sched.waiting) + len(sched.running) - slots)

    def abort(self, request_ids: list[str]) -> None:
        """Drops requests in flight (their partial samples are discarded; AReaL's abort-and-resubmit)."""
        if request_ids:
            self.llm.llm_engine.abort_request(list(request_ids))

    @staticmethod
    def _completion(c) -> Completion:
        ids = list(c.token_ids)
        lps = [float(d[t].logprob) for d, t in zip(c.logprobs or [], ids)]
        if len(lps) != len(ids):
            raise RuntimeError(f"engine returned {len(lps)} logprobs for {len(ids)} tokens")
        return Completion(ids, lps, c.finish_reason or "length", c.text)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Swap in new weights without restarting the engine; returns the seconds it took."""
        t0 = time.time()
        weights = list(named_tensors)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                          "is_checkpoint_format": True})
        # Requests in flight keep their KV (computed with the old weights) and continue under the new ones
        # (PipelineRL's in-flight update); only cached prefixes of finished requests are dropped.
        self.llm.reset_prefix_cache()
        return time.time() - t0

    def load_weights_from_dir(self, path: str | Path) -> float:
        t0 = time.time()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        self.llm.reset_prefix_cache()
        return time.time() - t0


def model_layout(model_path: str | Path) -> tuple[list[str], list[tuple[int, ...]]]:
    """Parameter names and shapes of the HF model at `model_path`, as the learner's `state_dict()` lists them
    (built on the meta device: no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names, shapes = zip(*[(n, tuple(t.shape)) for n, t in model.state_dict().items()])
    return list(names), list(shapes)


def make_engine(gc, model_path: str | Path, *, seed: int):
    """The engine `generator.backend` names, with the generator section's settings."""
    if gc.backend == "vllm":
        return VllmEngine(model_path, dtype=gc.dtype, max_model_len=gc.max_model_len, kv_cache_mb=gc.kv_cache_mb,
                          seed=seed, threads=gc.threads, tensor_parallel_size=gc.tensor_parallel_size)
    if gc.backend == "transformers":
        from generator.hf_engine import TransformersEngine

        return TransformersEngine(model_path, dtype=gc.dtype, max_model_len=gc.max_model_len, seed=seed,
                                  threads=gc.threads, max_num_seqs=gc.max_num_seqs)
    raise ValueError(f"unknown generator backend {gc.backend!r}")


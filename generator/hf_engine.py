"""The transformers fallback engine: the `VllmEngine` interface on a plain Hugging Face model.

For platforms vLLM does not support (`generator.backend: transformers`). vLLM is the default and the tested
path for training; this one is slower (bench/generator_backends.py) and simpler:

- Static batches with early exit: `step()` decodes one token for every running sample; requests submitted
  while a batch runs wait until it drains (no paged KV cache, so no joining mid-batch), at most
  `max_num_seqs` samples per batch. Finished samples leave the batch (their KV rows are dropped).
- Prompts are left-padded; the KV cache is transformers' `DynamicCache`; on the GPU when there is one.
- Sampling: temperature and top-p per request, greedy at temperature 0, from a seeded generator. The
  log-prob recorded is the sampled token's under the distribution it was sampled from (after temperature
  and top-p), as vLLM reports it with `logprobs_mode="processed_logprobs"`.
- A sample ends on EOS (kept in `token_ids`, as vLLM does), on a stop string (kept in the text, the text
  cut right after it), at `max_tokens`, or at `max_model_len`.
- New weights are copied into the resident parameters between steps (`load_weights`); samples in flight
  continue under them, as with vLLM's keep mode.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from generator.engine_api import Completion
from services.protocol import SamplingParams

log = logging.getLogger("orz.generator.hf_engine")

_STOP_WINDOW = 24  # tokens decoded at a sample's tail to look for stop strings


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    completions: list[Completion | None] = field(default_factory=list)


@dataclass
class _Row:
    request: _Request
    index: int  # sample index within the request
    limit: int  # max new tokens (max_tokens, and what fits in max_model_len)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class TransformersEngine:
    def __init__(self, model_path: str | Path, *, dtype: str = "float32", max_model_len: int = 256, seed: int = 0,
                 threads: int = 1, max_num_seqs: int = 256, device: str = "auto", **_: object) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        t0 = time.time()
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=getattr(torch, dtype)).eval()
        self.model.to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        eos = self.model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else next(iter(self.eos_ids), 0)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.queue: list[_Request] = []
        self.rows: list[_Row] = []  # the running batch, in KV-cache row order
        self.cache = None
        self.mask: torch.Tensor | None = None  # attention mask over prompt + generated positions
        self.next_pos: torch.Tensor | None = None  # position id of each row's next token
        self.logits: torch.Tensor | None = None  # each row's logits for its next token
        self._params = dict(self.model.state_dict(keep_vars=True))  # tied weights under both names
        log.info("transformers engine up in %.1f s (%s)", time.time() - t0, model_path)

    # --- the VllmEngine interface ---------------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], params: list[SamplingParams],
                 n: list[int]) -> list[list[Completion]]:
        ids = [f"generate-{i}" for i in range(len(prompt_ids))]
        for rid, prompt, p, k in zip(ids, prompt_ids, params, n):
            self.submit(rid, prompt, p, k)
        done: dict[str, list[Completion]] = {}
        while len(done) < len(ids):
            done.update(self.step())
        return [done[rid] for rid in ids]

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, n: int) -> None:
        if not prompt_ids:
            raise ValueError(f"request {request_id}: empty prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"request {request_id}: prompt of {len(prompt_ids)} tokens does not fit "
                             f"max_model_len {self.max_model_len}")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"request {request_id}: token id outside the vocabulary [0, {vocab})")
        self.queue.append(_Request(request_id, list(prompt_ids), params, n, [None] * n))

    def has_unfinished(self) -> bool:
        return bool(self.queue or self.rows)

    def abort(self, request_ids: list[str]) -> None:
        drop = set(request_ids)
        self.queue = [r for r in self.queue if r.request_id not in drop]
        keep = [i for i, row in enumerate(self.rows) if row.request.request_id not in drop]
        if len(keep) < len(self.rows):
            self._select(keep)

    def queued(self) -> int:
        return max(0, sum(r.n for r in self.queue) + len(self.rows) - self.max_num_seqs)

    def step(self) -> list[tuple[str, list[Completion]]]:
        """Decodes one token for every running sample (starting a batch first if none runs)."""
        if not self.rows:
            if not self.queue:
                return []
            self._start_batch()
        assert self.logits is not None and self.next_pos is not None and self.mask is not None
        tokens, logprobs = self._sample(self.logits)
        finished: list[tuple[str, list[Completion]]] = []
        keep: list[int] = []
        picked, picked_lp = tokens.tolist(), logprobs.tolist()  # one device sync per step, not per row
        for i, row in enumerate(self.rows):
            row.token_ids.append(picked[i])
            row.logprobs.append(picked_lp[i])
            reason, text = self._finish(row)
            if reason is None:
                keep.append(i)
                continue
            req = row.request
            req.completions[row.index] = Completion(row.token_ids, row.logprobs, reason, text)
            if all(c is not None for c in req.completions):
                finished.append((req.request_id, list(req.completions)))  # type: ignore[arg-type]
        last = tokens
        if len(keep) < len(self.rows):
            self._select(keep)
            last = tokens[keep]
        if self.rows:
            ones = torch.ones(len(self.rows), 1, dtype=self.mask.dtype, device=self.device)
            self.mask = torch.cat([self.mask, ones], dim=1)
            self._forward(last[:, None], self.next_pos[:, None])
            self.next_pos = self.next_pos + 1
        return finished

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        t0 = time.time()
        with torch.no_grad():
            for name, tensor in named_tensors:
                param = self._params.get(name)
                if param is None:
                    raise KeyError(f"the model has no parameter {name!r}")
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)} != the model's {tuple(param.shape)}")
                param.copy_(tensor)
        return time.time() - t0

    def load_weights_from_dir(self, path: str | Path) -> float:
        from safetensors.torch import load_file

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {path}")
        t0 = time.time()
        for f in files:
            self.load_weights(load_file(str(f)).items())
        return time.time() - t0

    # --- internals ------------------------------------------------------------------------------------

    def _start_batch(self) -> None:
        rows: list[_Row] = []
        while self.queue and len(rows) + self.queue[0].n <= max(self.max_num_seqs, self.queue[0].n):
            req = self.queue.pop(0)
            limit = min(req.params.max_tokens, self.max_model_len - len(req.prompt_ids))
            rows += [_Row(req, k, limit) for k in range(req.n)]
            if len(rows) >= self.max_num_seqs:
                break
        width = max(len(r.request.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            p = row.request.prompt_ids
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        from transformers import DynamicCache

        ids, mask = ids.to(self.device), mask.to(self.device)
        self.rows, self.cache, self.mask = rows, DynamicCache(), mask
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        self._forward(ids, positions)
        self.next_pos = mask.sum(dim=1)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> None:
        with torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions,
                             past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.logits = out.logits[:, -1, :].float()

    def _select(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.mask = self.next_pos = self.logits = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.next_pos, self.logits = self.mask[index], self.next_pos[index], self.logits[index]

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        like = {"dtype": logits.dtype, "device": logits.device}
        temps = torch.tensor([r.request.params.temperature for r in self.rows], **like)
        top_ps = torch.tensor([r.request.params.top_p for r in self.rows], **like)
        greedy = temps <= 0
        probs = torch.softmax(logits / torch.where(greedy, 1.0, temps)[:, None], dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p > top_ps[:, None]  # the top-p nucleus keeps >= 1 token
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        picked = torch.multinomial(sorted_p, 1, generator=self.generator).squeeze(1)
        tokens = order.gather(1, picked[:, None]).squeeze(1)
        # the sampled token's log-prob in the nucleus, renormalised: the distribution it was drawn from
        sampled = torch.log(sorted_p.gather(1, picked[:, None]).squeeze(1) / sorted_p.sum(dim=-1))
        best = logits.argmax(dim=-1)
        greedy_lp = torch.log_softmax(logits, dim=-1).gather(1, best[:, None]).squeeze(1)
        return torch.where(greedy, best, tokens), torch.where(greedy, greedy_lp, sampled)

    def _finish(self, row: _Row) -> tuple[str | None, str]:
        """(finish reason or None, the text so far if finished)."""
        if row.token_ids[-1] in self.eos_ids:
            return "stop", self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        stops = row.request.params.stop
        if stops:
            tail = self.tokenizer.decode(row.token_ids[-_STOP_WINDOW:], skip_special_tokens=True)
            if any(s in tail for s in stops):
                text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
                cut = min((text.find(s) + len(s) for s in stops if s in text), default=len(text))
                return "stop", text[:cut]
        if len(row.token_ids) >= row.limit:
            return "length", self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        return None, ""

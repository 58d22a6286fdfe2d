"""What the generator's loop asks of an engine (`Engine`) and what an engine hands back (`Completion`).

vLLM (generator/engine.py), transformers (generator/hf_engine.py) and the simulation's cost model
(generator/sim_engine.py) implement it; the loop (generator/worker.py) and the publisher see only this.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from services.protocol import SamplingParams


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # the sampled token's log-prob under the engine's weights (raw, before temperature)
    finish_reason: str  # "stop" | "length" | "abort"
    text: str


class Engine(Protocol):
    def generate(self, prompt_ids: list[list[int]], params: list[SamplingParams],
                 n: list[int]) -> list[list[Completion]]:
        """Blocking: every prompt's `n` completions (a warm-up call, evaluation)."""

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, n: int) -> None:
        """Adds a request to the running batch (continuous batching)."""

    def step(self) -> list[tuple[str, list[Completion]]]:
        """One engine step; the requests that finished in it, with all their completions."""

    def abort(self, request_ids: list[str]) -> None:
        """Drops requests in flight (a weight update in `abort` mode)."""

    def queued(self) -> int | None:
        """Samples that would wait for a batch slot: running plus waiting samples beyond `max_num_seqs` (0 while
        slots are free), or None if the engine cannot say. The generator submits a prompt only while fewer than
        its samples would wait, so a prompt is stamped with the weights version it starts under, not one from
        before a long wait in the engine's queue."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Loads HF-named tensors in place, between steps; returns the seconds it took."""

    def load_weights_from_dir(self, path: str | Path) -> float:
        """Loads a checkpoint directory (a generator joining a run under way)."""

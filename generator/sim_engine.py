"""A generator engine that sleeps for the time a GPU would take, for the cluster-scale simulation
(bench/simulate.py). Everything around it — the generator's loop, Redis, the reward round trip's shape,
weight sync — is the real code; only the GPU work is replaced by `services.costmodel.CostModel`.

It keeps the books vLLM keeps: running sequences up to `max_num_seqs` and the KV-cache capacity, new ones
admitted (prefilled) as others finish, the newest preempted and recomputed when the cache overflows. Each
`step()` advances a chunk of decode iterations (up to the next finishing sequence, at most `chunk_s` of
simulated time) and sleeps for their modelled duration × `time_scale`. Responses are real-sized arrays
(token ids and log-probs, and `chars_per_token` characters of text), so Redis and the protocol carry the
bytes a real run would.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from generator.engine_api import Completion
from generator.reward_client import Grade, GradeItem
from services.costmodel import CostModel, LengthModel
from services.protocol import SamplingParams


@dataclass
class _Seq:
    rid: str
    index: int
    prompt_len: int
    target: int  # response length this sequence will reach
    generated: int = 0
    prefilled: bool = False

    @property
    def context(self) -> int:
        return self.prompt_len + self.generated


@dataclass
class _Request:
    n: int
    max_tokens: int
    done: dict[int, int] = field(default_factory=dict)  # sample index → response length


class SimEngine:
    def __init__(self, cost: CostModel, lengths: LengthModel, time_scale: float, seed: int,
                 chunk_s: float = 2.0, chars_per_token: int = 4) -> None:
        self.cost, self.lengths, self.scale = cost, lengths, time_scale
        self.chunk_s = chunk_s
        self.chars_per_token = chars_per_token
        self.rng = np.random.default_rng(seed)
        self.requests: dict[str, _Request] = {}
        self.running: list[_Seq] = []
        self.waiting: deque[_Seq] = deque()
        self.simulated_s = 0.0  # modelled GPU time so far
        self.decoded_tokens = 0  # Σ running sequences × iterations: the mean batch is this / iterations
        self.iterations = 0
        self.preempted = 0

    # -- the engine interface the generator drives (generator/engine_api.py) --------------------------------
    def submit(self, rid: str, prompt_ids: list[int], sampling: SamplingParams, n: int) -> None:
        targets = self.lengths.sample(self.rng, n)
        self.requests[rid] = _Request(n, sampling.max_tokens)
        self.waiting.extend(_Seq(rid, i, len(prompt_ids), int(min(t, sampling.max_tokens)))
                            for i, t in enumerate(targets))

    def abort(self, rids: list[str]) -> None:
        gone = set(rids)
        self.running = [s for s in self.running if s.rid not in gone]
        self.waiting = deque(s for s in self.waiting if s.rid not in gone)
        for rid in gone:
            self.requests.pop(rid, None)

    def load_weights(self, weights) -> float:
        for _ in weights:  # the real tensors were received; the copy into GPU memory is modelled
            pass
        seconds = self.cost.load_s()
        self._sleep(seconds)
        return seconds

    def generate(self, prompts: list[list[int]], params: list[SamplingParams], ns: list[int]) -> list[list[Completion]]:
        """Start-up warm-up only: returns at once."""
        return [[Completion([1], [-0.1], "stop", "x") for _ in range(n)] for n in ns]

    def queued(self) -> int:
        return max(0, len(self.waiting) + len(self.running) - self.cost.max_num_seqs)

    def step(self) -> list[tuple[str, list[Completion]]]:
        prefill_tokens = self._admit()
        if not self.running:
            return []
        b = len(self.running)
        context = sum(s.context for s in self.running)
        to_finish = min(s.target - s.generated for s in self.running)
        iteration_s = self.cost.decode_iteration_s(b, context + b * to_finish / 2)
        k = max(1, min(to_finish, int(self.chunk_s / iteration_s)))
        room = (self.cost.kv_capacity_tokens - context) // b
        if room >= 1:
            k = min(k, int(room))
        # k iterations at contexts C, C + b, …, C + (k-1)b: the time is linear in the context, so k times the
        # time at the mean context is the exact sum (tests/unit/test_costmodel.py checks it token by token).
        seconds = self.cost.prefill_s(prefill_tokens) + k * self.cost.decode_iteration_s(b, context + b * (k - 1) / 2)
        self._sleep(seconds)
        self.decoded_tokens += b * k
        self.iterations += k
        finished: list[tuple[str, list[Completion]]] = []
        still = []
        for s in self.running:
            s.generated += k
            if s.generated >= s.target:
                req = self.requests.get(s.rid)
                if req is not None:
                    req.done[s.index] = s.target
                    if len(req.done) == req.n:
                        finished.append((s.rid, self._completions(self.requests.pop(s.rid))))
            else:
                still.append(s)
        self.running = still
        self._preempt()
        return finished

    # -- the books -----------------------------------------------------------------------------------------
    def _admit(self) -> int:
        """Moves waiting sequences in while there is room; returns the tokens to prefill."""
        tokens = 0
        context = sum(s.context for s in self.running)
        while self.waiting and len(self.running) < self.cost.max_num_seqs:
            s = self.waiting[0]
            if context + s.context > self.cost.kv_capacity_tokens and self.running:
                break
            self.waiting.popleft()
            self.running.append(s)
            context += s.context
            tokens += s.context  # a preempted sequence recomputes its whole context (vLLM's recompute mode)
        return tokens

    def _preempt(self) -> None:
        context = sum(s.context for s in self.running)
        while context > self.cost.kv_capacity_tokens and len(self.running) > 1:
            s = self.running.pop()  # the newest goes back to the front of the queue
            context -= s.context
            self.waiting.appendleft(s)
            self.preempted += 1

    def _completions(self, req: _Request) -> list[Completion]:
        out = []
        for i in range(req.n):
            t = req.done[i]
            ids = np.full(t, 42, dtype=np.int32)  # real-sized; the values do not matter to anything downstream
            logprobs = np.full(t, -0.5, dtype=np.float32)
            reason = "length" if t >= req.max_tokens else "stop"
            out.append(Completion(ids, logprobs, reason, "x" * (t * self.chars_per_token)))
        return out

    def _sleep(self, simulated_s: float) -> None:
        self.simulated_s += simulated_s
        time.sleep(simulated_s * self.scale)


class SimRewardClient:
    """The reward server's round trip as a cost model: sleeps `CostModel.grade_s(items)` × time_scale and
    scores each item correct with probability `p_correct` (0 when truncated)."""

    def __init__(self, cost: CostModel, time_scale: float, seed: int, p_correct: float = 0.5) -> None:
        self.cost, self.scale, self.p_correct = cost, time_scale, p_correct
        self.rng = np.random.default_rng(seed)

    def grade(self, items: list[GradeItem]) -> list[Grade]:
        time.sleep(self.cost.grade_s(len(items)) * self.scale)
        out = []
        for item in items:
            correct = not item.truncated and self.rng.random() < self.p_correct
            out.append(Grade(item.id, 1.0 if correct else 0.0, None, "correct" if correct else "wrong"))
        return out

    def close(self) -> None:
        pass

"""A weight update while requests are in flight, on a real vLLM engine, in both modes:
`keep` (PipelineRL) lets them finish under the new weights — their groups carry both versions; `abort`
(AReaL) drops them and samples them again, so every sample comes from the new version alone."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from generator.engine import VllmEngine
from generator.worker import Generator
from learner.base_model import build_base_model
from services.config import Config
from services.protocol import PromptTask, SamplingParams
from services.tasks import all_problems


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = Config.model_validate({"model": {"pretrain_steps": 20, "pretrain_batch": 16}})
    return build_base_model(cfg, tmp_path_factory.mktemp("model"), force=True)


class _Handover:
    """Stands in for the weight-listener thread: holds one received version for the main loop."""

    def __init__(self, version: int, weights: list) -> None:
        self.pending: tuple[int, list] | None = (version, weights)
        self.released = False
        self.stopped = False

    def take(self):
        pending, self.pending = self.pending, None
        return pending

    def release(self) -> None:
        self.released = True


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["keep", "abort"])
def test_update_with_requests_in_flight(mode: str, model_dir: Path, redis_url: str) -> None:
    cfg = Config.model_validate({"redis": {"url": redis_url}, "reward": {"url": "http://127.0.0.1:9"},
                                 "generator": {"weight_update_mode": mode}})
    gen = Generator(cfg, "gen-test")
    gen.engine = VllmEngine(model_dir, kv_cache_mb=32, seed=0)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    params = SamplingParams(1.0, 1.0, 40, ())
    for i, p in enumerate(all_problems(2, 2, 9)[:3]):
        ids = tuple(tok.encode(p.prompt, add_special_tokens=False))
        gen.waiting.append((f"1-{i}", PromptTask(f"t{i}", p.prompt, str(p.answer), "arith", 2, params, 0, ids),
                            time.time()))
    gen._submit_ready(_Handover(0, []))
    assert len(gen.inflight) == 3 and gen.version == 0
    for _ in range(3):
        assert gen.engine.step() == []  # 40 tokens: nothing finishes in 3 steps
    old_ids = set(gen.inflight)

    weights = load_file(str(model_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    new = [(n, t + 0.05 * torch.randn(t.shape, generator=g)) for n, t in weights.items()]
    handover = _Handover(1, new)
    gen._load_pending(handover)
    assert gen.version == 1 and handover.released

    if mode == "abort":
        assert gen.inflight == {} and not gen.engine.has_unfinished()
        assert [e for e, _, _ in gen.waiting] == ["1-0", "1-1", "1-2"]  # resubmitted, in order
        assert gen.metrics.aborted._value.get() == 3
        gen._submit_ready(handover)
        assert not set(gen.inflight) & old_ids  # new engine requests
    else:
        assert set(gen.inflight) == old_ids and gen.waiting == []
    assert {job.version_first for job in gen.inflight.values()} == ({1} if mode == "abort" else {0})
    finished = []
    while gen.engine.has_unfinished():
        finished += gen.engine.step()
    assert sorted(rid.split("#")[0] for rid, _ in finished) == ["1-0", "1-1", "1-2"]
    assert all(len(comps) == 2 and all(c.finish_reason != "abort" for c in comps) for _, comps in finished)

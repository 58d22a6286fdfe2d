"""The generator's vLLM engine for real: continuous batching (submit/step) and in-flight weight swaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from generator.engine import VllmEngine
from learner.base_model import build_base_model
from services.config import Config
from services.protocol import SamplingParams
from services.tasks import all_problems


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = Config.model_validate({"model": {"pretrain_steps": 20, "pretrain_batch": 16}})
    return build_base_model(cfg, tmp_path_factory.mktemp("model"), force=True)


def _hf_logprobs(model, prompt: list[int], response: list[int], temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    logp = torch.log_softmax(logits / temperature, -1)
    return torch.tensor([logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(response)])


@pytest.mark.slow
def test_continuous_batching_and_in_flight_weight_swap(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [tok.encode(p.prompt, add_special_tokens=False) for p in all_problems(2, 2, 9)[:6]]
    engine = VllmEngine(model_dir, kv_cache_mb=32, seed=0)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=24)

    for i, ids in enumerate(prompts[:3]):
        engine.submit(f"r{i}", ids, params, n=2)
    sched = engine.llm.llm_engine.engine_core.engine_core.scheduler
    assert len(sched.waiting) == 6  # one child request per sample, what queued() counts
    assert engine.queued() == 0  # 6 samples and 256 slots: none would wait
    finished: dict[str, list] = {}
    steps = 0
    while engine.has_unfinished():
        if steps == 2:  # new requests join a running batch
            for i, ids in enumerate(prompts[3:], start=3):
                engine.submit(f"r{i}", ids, params, n=2)
        finished.update(engine.step())
        steps += 1
    assert sorted(finished) == [f"r{i}" for i in range(6)]
    assert engine.queued() == 0
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for rid, comps in finished.items():
        assert len(comps) == 2
        for c in comps:
            assert c.finish_reason in ("stop", "length") and len(c.token_ids) == len(c.logprobs) > 0
            # The engine's behaviour log-probs are the model's (fp32): the learner can trust μ.
            ref = _hf_logprobs(hf, prompts[int(rid[1:])], c.token_ids)
            assert torch.max(torch.abs(ref - torch.tensor(c.logprobs))).item() < 1e-4

    # Swap in perturbed weights while requests are in flight; they finish, and new samples follow the new weights.
    engine.submit("late", prompts[0], params, n=2)
    engine.step()
    state = load_file(str(model_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    engine.load_weights(perturbed.items())
    late = {}
    while engine.has_unfinished():
        late.update(engine.step())
    assert list(late) == ["late"] and len(late["late"]) == 2
    hf.load_state_dict(perturbed, strict=False)
    engine.submit("after", prompts[1], params, n=1)
    after = {}
    while engine.has_unfinished():
        after.update(engine.step())
    c = after["after"][0]
    ref = _hf_logprobs(hf, prompts[1], c.token_ids)
    assert torch.max(torch.abs(ref - torch.tensor(c.logprobs))).item() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_learner_logprobs_match_generator(model_dir: Path, temperature: float) -> None:
    """μ (vLLM's sampled-token log-probs) against the learner's own computation on the same weights: padded,
    length-sorted micro-batches through `build_batch` and `token_logprobs`, as a training step does it. At
    T = 0.6 both must be of the tempered distribution that was sampled."""
    from learner.batch import build_batch, microbatches
    from learner.trainer import token_logprobs
    from services.protocol import Sample, TrajectoryGroup

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    problems = all_problems(2, 3, 9)[::97][:12]
    prompts = [tok.encode(p.prompt, add_special_tokens=False) for p in problems]
    engine = VllmEngine(model_dir, kv_cache_mb=32, seed=3)
    params = SamplingParams(temperature=temperature, top_p=1.0, max_tokens=40)
    out = engine.generate(prompts, [params] * len(prompts), [4] * len(prompts))
    groups = [
        TrajectoryGroup(f"t{i}", np.array(p, dtype=np.int32),
                        tuple(Sample(np.array(c.token_ids, dtype=np.int32), np.array(c.logprobs, dtype=np.float32),
                                     0.0, c.finish_reason, "") for c in comps), 0, "g")
        for i, (p, comps) in enumerate(zip(prompts, out, strict=True))
    ]
    batch = build_batch(groups, tok.pad_token_id)
    actor = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    learner_lp = torch.zeros_like(batch.behavior_logprobs)
    mbs = microbatches(batch, 600)
    assert len(mbs) > 1  # several padded micro-batches of different widths
    with torch.no_grad():
        for rows in mbs:
            mb = batch.select(rows)
            learner_lp[rows, : mb.response_mask.shape[1]] = token_logprobs(actor, mb, temperature=temperature)
    mask = batch.response_mask.bool()
    delta = (learner_lp - batch.behavior_logprobs).abs()[mask]
    print(f"T={temperature}: generator vs learner log-probs: max |Δ| = {delta.max().item():.2e} over "
          f"{int(mask.sum())} tokens")
    assert int(mask.sum()) > 200
    assert delta.max().item() < 1e-4

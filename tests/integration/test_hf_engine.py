"""The transformers fallback engine against transformers' own forward pass and `generate`, on a real model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from generator.hf_engine import TransformersEngine
from learner.base_model import build_base_model
from services.config import Config
from services.protocol import SamplingParams
from services.tasks import all_problems


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = Config.model_validate({"model": {"pretrain_steps": 20, "pretrain_batch": 16}})
    return build_base_model(cfg, tmp_path_factory.mktemp("model"), force=True)


@pytest.fixture(scope="module")
def prompts(model_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    problems = all_problems(2, 3, 9)
    # Different lengths, so the batch is left-padded.
    picked = [problems[0], problems[-1], problems[len(problems) // 2], problems[7]]
    ids = [tok.encode(p.prompt, add_special_tokens=False) for p in picked]
    assert len({len(i) for i in ids}) > 1
    return ids


def _hf_logprobs(model, prompt: list[int], response: list[int], temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    logp = torch.log_softmax(logits / temperature, -1)
    return torch.tensor([logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(response)])


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_logprobs_match_a_forward_pass(model_dir: Path, prompts: list[list[int]], temperature: float) -> None:
    """The recorded log-probs are of the distribution sampled: softmax(logits / T)."""
    engine = TransformersEngine(model_dir, seed=0)
    outs = engine.generate(prompts, [SamplingParams(temperature, 1.0, 20)] * len(prompts), [3] * len(prompts))
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    assert [len(o) for o in outs] == [3] * len(prompts)
    for prompt, comps in zip(prompts, outs):
        for c in comps:
            assert len(c.token_ids) == len(c.logprobs) > 0
            assert (c.finish_reason == "length") == (len(c.token_ids) == 20)
            ref = _hf_logprobs(hf, prompt, c.token_ids, temperature)
            assert torch.max(torch.abs(ref - torch.tensor(c.logprobs))).item() < 1e-4
    assert not engine.has_unfinished()


def test_greedy_matches_transformers_generate(model_dir: Path, prompts: list[list[int]]) -> None:
    engine = TransformersEngine(model_dir, seed=0)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    # No stop string: transformers' generate stops only at EOS (the tiny model's guesses end at </answer>
    # within 16 tokens, where the default stop would cut ours short).
    greedy = SamplingParams(0.0, 1.0, 16, ())
    nucleus_of_one = SamplingParams(1.0, 1e-9, 16, ())  # top-p this small keeps only the most likely token
    outs = engine.generate(prompts, [greedy, nucleus_of_one] * (len(prompts) // 2), [1] * len(prompts))
    eos = engine.tokenizer.eos_token_id
    for prompt, comps in zip(prompts, outs):
        with torch.no_grad():  # one prompt at a time: no padding involved in the reference
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos)[0, len(prompt):].tolist()
        assert comps[0].token_ids == ref


def test_stop_strings_eos_and_max_model_len(model_dir: Path, prompts: list[list[int]]) -> None:
    engine = TransformersEngine(model_dir, seed=1, max_model_len=len(max(prompts, key=len)) + 12)
    tok = engine.tokenizer
    outs = engine.generate(prompts, [SamplingParams(1.0, 1.0, 64, ("</answer>",))] * len(prompts),
                           [4] * len(prompts))
    for prompt, comps in zip(prompts, outs):
        for c in comps:
            if c.finish_reason == "length":  # the engine's length limit, not max_tokens
                assert len(prompt) + len(c.token_ids) == engine.max_model_len
            elif c.token_ids[-1] == tok.eos_token_id:
                assert "</answer>" not in c.text
            else:
                assert c.text.endswith("</answer>") and c.text.count("</answer>") == 1
    # A stop string the model emits (greedy, so known in advance): it ends the sample, the text is cut
    # right after its first occurrence, and the tokens stop at the one that completed it.
    free = engine.generate([prompts[1]], [SamplingParams(0.0, 1.0, 10)], [1])[0][0]
    assert len(free.text) >= 6, free
    stop = free.text[3:6]
    stopped = engine.generate([prompts[1]], [SamplingParams(0.0, 1.0, 10, (stop,))], [1])[0][0]
    cut = free.text.find(stop) + len(stop)
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:cut]
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    assert stop not in tok.decode(stopped.token_ids[:-1])


def test_abort_and_weight_swap_between_steps(model_dir: Path, prompts: list[list[int]], tmp_path: Path) -> None:
    engine = TransformersEngine(model_dir, seed=0)
    params = SamplingParams(0.0, 1.0, 12)
    for i, p in enumerate(prompts):
        engine.submit(f"r{i}", p, params, 2)
    first = engine.step()
    assert first == [] and engine.has_unfinished()
    engine.abort(["r1", "r3"])
    done: dict[str, list] = {}
    while engine.has_unfinished():
        done.update(engine.step())
    assert sorted(done) == ["r0", "r2"]

    # New weights: greedy outputs follow the loaded model (a copy with perturbed weights saved to disk).
    other = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    other.save_pretrained(str(tmp_path / "other"))
    engine.load_weights_from_dir(tmp_path / "other")
    swapped = engine.generate([prompts[0]], [params], [1])[0][0].token_ids
    with torch.no_grad():
        eos = engine.tokenizer.eos_token_id
        ref = other.eval().generate(torch.tensor([prompts[0]]), max_new_tokens=12, do_sample=False,
                                    eos_token_id=eos, pad_token_id=eos)[0, len(prompts[0]):].tolist()
    assert swapped == ref
    with pytest.raises(KeyError, match="no parameter"):
        engine.load_weights([("model.nope.weight", torch.zeros(1))])

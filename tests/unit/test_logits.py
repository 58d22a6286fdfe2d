"""Chunked log-probs (learner/logits.py) equal the full-logits computation, forward and gradients, in fp64;
the peak memory of one forward+backward grows with the chunk, not with the number of tokens."""

from __future__ import annotations

import copy
import gc
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from learner.batch import build_batch
from learner.logits import ChunkedHead, chunked_token_logprobs, install_chunked_head
from learner.trainer import token_logprobs
from services.memory import peak_rss_mb, reset_peak_rss, rss_mb
from services.protocol import Sample, TrajectoryGroup


def _reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    logp_all = torch.log_softmax(hidden @ weight.t(), dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(1, targets[:, None]).squeeze(1), entropy


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunked_logprobs_and_entropy_equal_the_full_softmax_with_their_gradients(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 8, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (20,), generator=g)
    up_logp, up_ent = torch.randn(20, dtype=torch.float64, generator=g), torch.randn(20, dtype=torch.float64,
                                                                                     generator=g)
    logp, ent = chunked_token_logprobs(hidden, weight, targets, chunk, with_entropy=True)
    ref_logp, ref_ent = _reference(hidden, weight, targets)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-12)
    got = torch.autograd.grad((logp * up_logp).sum() + (ent * up_ent).sum(), (hidden, weight))
    want = torch.autograd.grad((ref_logp * up_logp).sum() + (ref_ent * up_ent).sum(), (hidden, weight))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda h, w: chunked_token_logprobs(h, w, targets, chunk, True),
                                    (hidden[:5].detach().requires_grad_(), weight.detach().requires_grad_()))


def _group(task: str, prompt: list[int], responses: list[list[int]]) -> TrajectoryGroup:
    samples = tuple(Sample(np.array(r, np.int32), np.full(len(r), -0.5, np.float32), 0.0, "stop", "")
                    for r in responses)
    return TrajectoryGroup(task, np.array(prompt, np.int32), samples, 0, "g")


@pytest.mark.parametrize("tied", [False, True])
def test_a_model_with_the_chunked_head_gives_the_same_logprobs_entropy_and_gradients(tied: bool) -> None:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tied)
    full = Qwen2ForCausalLM(cfg).double()
    chunked = copy.deepcopy(full)
    head = install_chunked_head(chunked, chunk_tokens=3)
    assert isinstance(chunked.get_output_embeddings(), ChunkedHead) and head.weight is chunked.lm_head.weight
    if tied:
        assert chunked.lm_head.weight is chunked.model.embed_tokens.weight
    assert set(chunked.state_dict()) == set(full.state_dict())  # checkpoint names unchanged
    b = build_batch([_group("a", [5, 6, 7], [[8, 9], [10, 11, 12, 13]]), _group("b", [4], [[3, 2, 1]])], pad_id=0)
    b.response_mask = b.response_mask.double()
    results = []
    for model in (full, chunked):
        logp, ent = token_logprobs(model, b, with_entropy=True)
        loss = (logp * b.response_mask).sum() + 0.3 * (ent * b.response_mask).sum()
        loss.backward()
        results.append((logp * b.response_mask, ent * b.response_mask,
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp_a, ent_a, grads_a), (lp_b, ent_b, grads_b) = results
    torch.testing.assert_close(lp_b, lp_a, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent_b, ent_a, rtol=0, atol=1e-12)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-11, msg=name)
    # outside a gather, the head is the plain linear head (generation, evaluation)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(chunked(input_ids=ids).logits, full(input_ids=ids).logits, rtol=0, atol=1e-12)


def _peak_growth(runs: list[tuple[int, int]], queue) -> None:  # noqa: ANN001
    """In a fresh process: for each (tokens, chunk), the peak RSS growth of one forward+backward, vocab 32k."""
    torch.set_num_threads(1)
    out = []
    for tokens, chunk in runs:
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(tokens, 64, generator=g, requires_grad=True)
        weight = torch.randn(32_000, 64, generator=g, requires_grad=True)
        targets = torch.randint(0, 32_000, (tokens,), generator=g)
        gc.collect()
        reset_peak_rss()
        before = rss_mb()
        logp, _ = chunked_token_logprobs(hidden, weight, targets, chunk)
        logp.sum().backward()
        out.append(peak_rss_mb() - before)
        del hidden, weight, logp
    queue.put(out)


def test_peak_memory_grows_with_the_chunk_not_with_the_tokens() -> None:
    # A fixed mmap threshold: glibc then returns every freed large tensor to the OS, so RSS follows what is live.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_peak_growth, args=([(4096, 256), (16_384, 256), (16_384, 2048)], queue))
        proc.start()
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    small, large, wide = queue.get(timeout=120)
    proc.join(30)
    # One full [tokens, 32k] fp32 logits tensor: 4,096 tokens = 500 MB, 16,384 tokens = 2 GB.
    print(f"peak growth: 4k tokens/chunk 256 {small:.0f} MB, 16k/256 {large:.0f} MB, 16k/2048 {wide:.0f} MB")
    assert large < small + 30, (small, large)  # 4x the tokens: only the per-token vectors grow (a few 100 kB)
    assert large < 150  # the 32k x 64 head and its gradients, one [256, 32k] chunk (31 MB): not 2 GB
    assert wide > large + 150, (large, wide)  # 8x the chunk: one [2048, 32k] fp32 chunk is 250 MB


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_logprobs_are_of_the_tempered_distribution(temperature: float) -> None:
    """softmax(logits / T), worked out from the model's plain logits, by the full and the chunked head alike,
    forward and gradients (fp64): what the generator sampled from at temperature T."""
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    full = Qwen2ForCausalLM(cfg).double()
    chunked = copy.deepcopy(full)
    install_chunked_head(chunked, chunk_tokens=2)
    b = build_batch([_group("a", [5, 6, 7], [[8, 9], [10, 11, 12, 13]]), _group("b", [4], [[3, 2, 1]])], pad_id=0)
    mask = b.response_mask.bool()
    with torch.no_grad():
        logits = full(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    by_hand = torch.log_softmax(logits / temperature, -1)[:, :-1].gather(2, b.input_ids[:, 1:, None])[..., 0]
    by_hand = by_hand.gather(1, b.response_index)
    grads = []
    for model in (full, chunked):
        logp = token_logprobs(model, b, temperature=temperature)
        torch.testing.assert_close(logp[mask], by_hand[mask], rtol=0, atol=1e-12)
        (logp * b.response_mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-11, msg=name)
    untempered = token_logprobs(full, b)
    assert (untempered - by_hand)[mask].abs().max() > 1e-3  # T matters

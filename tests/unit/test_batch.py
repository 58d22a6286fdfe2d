"""Batch layout: response-aligned grids, micro-batch token budgets, and the learner's log-prob gather."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from learner.batch import build_batch, microbatches, pack
from learner.trainer import token_logprobs
from services.protocol import Sample, TrajectoryGroup


def _group(task: str, prompt: list[int], responses: list[list[int]], rewards: list[float]) -> TrajectoryGroup:
    samples = tuple(
        Sample(np.array(r, dtype=np.int32), np.full(len(r), -0.5, dtype=np.float32), rw,
               "length" if i == 0 else "stop", "")
        for i, (r, rw) in enumerate(zip(responses, rewards))
    )
    return TrajectoryGroup(task, np.array(prompt, dtype=np.int32), samples, 3, "g")


def test_build_batch_places_responses_and_rewards() -> None:
    groups = [_group("a", [5, 6, 7], [[8, 9], [10, 11, 12, 13]], [1.0, 0.0]), _group("b", [4], [[3]], [1.0])]
    b = build_batch(groups, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0], [5, 6, 7, 10, 11, 12, 13], [4, 3, 0, 0, 0, 0, 0]]
    assert b.attention_mask.sum(1).tolist() == [5, 7, 2]
    # Response token t of a row with prompt length P is predicted at shifted position P - 1 + t.
    assert b.response_index[0, :2].tolist() == [2, 3]
    assert b.response_index[1].tolist() == [2, 3, 4, 5]
    assert b.response_index[2, :1].tolist() == [0]
    assert b.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    # ORZ: the 0/1 reward sits on the last response token only.
    assert b.rewards.tolist() == [[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    assert b.truncated.tolist() == [True, False, True]
    assert b.group_of.tolist() == [0, 0, 1]
    sub = b.select(torch.tensor([2]))
    assert sub.input_ids.shape == (1, 2) and sub.response_mask.shape == (1, 1)


def test_microbatches_respect_the_token_budget_and_cover_every_row() -> None:
    rng = np.random.default_rng(0)
    groups = [_group(str(i), [1] * int(rng.integers(1, 20)), [[2] * int(rng.integers(1, 30))], [0.0])
              for i in range(40)]
    b = build_batch(groups, pad_id=0)
    for budget in (64, 100, 1000):
        mbs = microbatches(b, budget)
        rows = sorted(int(r) for mb in mbs for r in mb)
        assert rows == list(range(b.size))
        for mb in mbs:
            assert len(mb) == 1 or int(b.seq_lens[mb].max()) * len(mb) <= budget


def test_token_logprobs_match_a_per_sequence_forward() -> None:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg).eval()
    groups = [_group("a", [5, 6, 7], [[8, 9], [10, 11, 12, 13]], [1.0, 0.0]), _group("b", [4], [[3, 2, 1]], [1.0])]
    b = build_batch(groups, pad_id=0)
    with torch.no_grad():
        batched = token_logprobs(model, b)
        for i, (prompt, resp) in enumerate([([5, 6, 7], [8, 9]), ([5, 6, 7], [10, 11, 12, 13]), ([4], [3, 2, 1])]):
            ids = torch.tensor([prompt + resp])
            logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
            expected = [logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(resp)]
            assert torch.allclose(batched[i, : len(resp)], torch.tensor(expected), atol=1e-5)


def test_pack_by_hand() -> None:
    groups = [_group("a", [5, 6, 7], [[8, 9], [10, 11, 12, 13]], [1.0, 0.0]), _group("b", [4], [[3]], [1.0])]
    b = build_batch(groups, pad_id=0)
    p = pack(b)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 5, 6, 7, 10, 11, 12, 13, 4, 3]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1]]
    # row 2's response starts at packed offset 5 (+2), row 3's at offset 12 (+0); masked columns point anywhere
    index = p.response_index.reshape(3, 4)
    assert index[0, :2].tolist() == [2, 3] and index[1].tolist() == [7, 8, 9, 10] and index[2, :1].tolist() == [12]
    targets = p.input_ids.gather(1, p.response_index + 1).reshape(3, 4)
    assert targets[0, :2].tolist() == [8, 9] and targets[1].tolist() == [10, 11, 12, 13] and targets[2, 0] == 3


def test_packed_microbatches_count_real_tokens() -> None:
    lengths = [12, 8, 6, 4]
    b = build_batch([_group(f"g{n}", [1], [[2] * (n - 1)], [0.0]) for n in lengths], pad_id=0)
    # padded: rows × the longest ≤ 20 → [12], [8, 6] (2 × 8), [4]; packed: 12 + 8, then 6 + 4
    assert [r.tolist() for r in microbatches(b, 20)] == [[0], [1, 2], [3]]
    assert [r.tolist() for r in microbatches(b, 20, packed=True)] == [[0, 1], [2, 3]]

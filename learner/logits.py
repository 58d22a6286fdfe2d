"""Log-probs (and entropy) of the response tokens from the final hidden states, a chunk of positions at a time.

A causal LM's head turns every position's hidden state into a row of `vocab` logits. For a micro-batch of
ORZ-7B's recipe (65,536 tokens, Qwen2.5's 152k vocabulary) the fp32 logits alone would be 40 GB, and a
log-softmax over them as much again. The learner needs one number per response token: log π(a_t|s_t).
So the head is applied here to the response positions only, `chunk_tokens` of them at a time, and each
chunk's logits live only inside this function: the forward keeps, per token, the log-normaliser (one
float), and the backward recomputes each chunk's logits from the hidden states and the head's weight. Peak
memory grows with the chunk (a few `chunk × vocab` fp32 tensors), not with the micro-batch.

Gradients, per row i of a chunk with logits z, p = softmax(z), target a (Rennie's and Liger's fused linear
cross-entropy write the same):
    ∂ log p_a / ∂z   = onehot(a) − p
    ∂ H / ∂z         = −p · (log p + H)          where H = −Σ p log p
    ∂ / ∂h           = g_z · W,    ∂ / ∂W += g_zᵀ · h
The softmax is taken in fp32 at least (fp64 models stay fp64), whatever the matmul's dtype (bf16 under
`learner.dtype: bfloat16`).

`ChunkedHead` puts this inside the model's own forward, in place of its `lm_head` (same weight object, so
tied embeddings stay tied and checkpoint names are unchanged), so that FSDP2's hooks gather and reduce the
head's weight as they do for an ordinary head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Works in place on each chunk's logits, so that a chunk costs two [chunk, vocab] tensors at most (one
    without entropy in the forward), plus the matmul's output when it is in a narrower dtype."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int,  # noqa: ANN001 (autograd ctx)
                with_entropy: bool) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        sm = _softmax_dtype(hidden.dtype)
        logp = torch.empty(n, dtype=sm, device=hidden.device)
        lse = torch.empty(n, dtype=sm, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=sm, device=hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            z = (hidden[rows] @ weight.t()).to(sm)
            target_z = z.gather(1, targets[rows, None]).squeeze(1)
            top = z.amax(dim=-1, keepdim=True)
            z.sub_(top)  # z − max: exp cannot overflow
            if with_entropy:
                e = z.exp()
                total = e.sum(-1)
                # H = log Σe − Σ e·(z − max) / Σe
                entropy[rows] = total.log() - e.mul_(z).sum(-1) / total
                del e
            else:
                total = z.exp_().sum(-1)
            lse[rows] = top.squeeze(1) + total.log()
            logp[rows] = target_z - lse[rows]
            del z
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.chunk, ctx.with_entropy = chunk, with_entropy
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor, grad_entropy: Tensor):  # noqa: ANN001, ANN205
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        sm = lse.dtype
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=sm, device=weight.device) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, min(hidden.shape[0], start + ctx.chunk))
            gl = grad_logp[rows, None].to(sm)
            g = (hidden[rows] @ weight.t()).to(sm)
            g.sub_(lse[rows, None])  # log p
            if ctx.with_entropy:
                # g = −p · (∂L/∂logp_a + (log p + H) · ∂L/∂H), then + ∂L/∂logp_a at the target
                p = g.exp()
                g.add_(entropy[rows, None]).mul_(grad_entropy[rows, None].to(sm)).add_(gl)
                g.mul_(p).neg_()
                del p
            else:
                g.exp_().mul_(-gl)  # −p · ∂L/∂logp_a
            g.scatter_add_(1, targets[rows, None], gl)
            g = g.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = g @ weight
            if grad_weight is not None:
                grad_weight += (g.t() @ hidden[rows]).to(sm)
            del g
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None


def chunked_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int,
                           with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """log softmax(h Wᵀ)[target] for each row of `hidden` [N, H] (and the entropy of each row's distribution),
    `chunk_tokens` rows at a time; never a [N, vocab] tensor, forward or backward."""
    logp, entropy = _ChunkedTokenLogprobs.apply(hidden, weight, targets, max(1, int(chunk_tokens)), with_entropy)
    return logp, (entropy if with_entropy else None)


@dataclass
class _Request:
    positions: Tensor  # long [B, T]: the sequence position whose hidden state predicts response token t
    targets: Tensor  # long [B, T]: the response token ids
    mask: Tensor  # [B, T], 1 on real response tokens
    with_entropy: bool
    temperature: float = 1.0  # log-probs of softmax(logits / T): the distribution the generator sampled
    entropy: Tensor | None = None


class ChunkedHead(nn.Module):
    """A causal LM's output head that, inside `gather(...)`, returns the response tokens' log-probs [B, T]
    (computed in chunks) instead of logits; outside it, it is the plain linear head."""

    def __init__(self, weight: nn.Parameter, chunk_tokens: int) -> None:
        super().__init__()
        self.weight = weight  # the head's own parameter object: ties and state-dict names stay as they were
        self.chunk_tokens = chunk_tokens
        self._request: _Request | None = None

    @contextlib.contextmanager
    def gather(self, positions: Tensor, targets: Tensor, mask: Tensor, with_entropy: bool,
               temperature: float = 1.0) -> Iterator[_Request]:
        self._request = _Request(positions, targets, mask, with_entropy, temperature)
        try:
            yield self._request
        finally:
            self._request = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        req = self._request
        if req is None:
            return nn.functional.linear(hidden_states, self.weight)
        h = hidden_states.gather(1, req.positions.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]))
        valid = req.mask.bool()
        h = h if req.temperature == 1.0 else h / req.temperature  # (h / T) Wᵀ = logits / T
        logp_valid, ent_valid = chunked_token_logprobs(h[valid], self.weight, req.targets[valid], self.chunk_tokens,
                                                       req.with_entropy)
        out = torch.zeros(valid.shape, dtype=logp_valid.dtype, device=h.device)
        out = out.masked_scatter(valid, logp_valid)
        if ent_valid is not None:
            req.entropy = torch.zeros(valid.shape, dtype=ent_valid.dtype, device=h.device).masked_scatter(
                valid, ent_valid)
        return out


def install_chunked_head(model: nn.Module, chunk_tokens: int) -> ChunkedHead:
    """Replaces `model`'s output head by a `ChunkedHead` on the same weight (before FSDP sharding)."""
    old = model.get_output_embeddings()
    if getattr(old, "bias", None) is not None:
        raise ValueError("chunked log-probs need an output head without a bias")
    head = ChunkedHead(old.weight, chunk_tokens)
    model.set_output_embeddings(head)
    return head

"""learner/gae.py against hand-worked numbers and an independent brute-force GAE over python floats."""

from __future__ import annotations

import math

import pytest
import torch

from learner.gae import compute_gae
from learner.masked import masked_mean, masked_whiten


def brute_force_gae(
    rewards: list[list[float]], values: list[list[float]], lengths: list[int], gamma: float, lam: float
) -> tuple[list[list[float]], list[list[float]]]:
    """The GAE paper's sum form, A_t = Σ_l (γλ)^l δ_{t+l}, with explicit loops and V = 0 after the end."""
    advantages, returns = [], []
    for r, v, n in zip(rewards, values, lengths, strict=True):
        horizon = len(r)
        deltas = [r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t] for t in range(n)]
        a_row = [0.0] * horizon
        for t in range(n):
            a_row[t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
        advantages.append(a_row)
        returns.append([a_row[t] + v[t] if t < n else 0.0 for t in range(horizon)])
    return advantages, returns


def prefix_mask(lengths: list[int], horizon: int) -> torch.Tensor:
    return (torch.arange(horizon)[None, :] < torch.tensor(lengths)[:, None]).double()


def test_hand_worked_example() -> None:
    # γ = λ = 0.5, one row of valid length 2 padded to T = 3 (padding holds junk that must be ignored).
    #   rewards = [0, 1 | 7], values = [0.5, 0.25 | 9]; V after the last valid token is 0.
    #   δ_1 = r_1 + γ·0   − V_1 = 1 − 0.25          =  0.75
    #   δ_0 = r_0 + γ·V_1 − V_0 = 0 + 0.125 − 0.5   = −0.375
    #   A_1 = δ_1                                   =  0.75
    #   A_0 = δ_0 + γλ·A_1 = −0.375 + 0.25·0.75     = −0.1875
    #   R   = A + V = [−0.1875 + 0.5, 0.75 + 0.25]  = [0.3125, 1.0]
    rewards = torch.tensor([[0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.25, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.5, lam=0.5)
    assert advantages.tolist() == [[-0.1875, 0.75, 0.0]]
    assert returns.tolist() == [[0.3125, 1.0, 0.0]]


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (1.0, 0.95), (0.9, 1.0), (0.5, 0.0), (0.0, 0.7)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(gamma: float, lam: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 7, (1,), generator=gen))
    horizon = int(torch.randint(1, 13, (1,), generator=gen))
    lengths = torch.randint(0, horizon + 1, (batch,), generator=gen).tolist()
    lengths[0] = horizon  # at least one full row, and (often) an empty one from randint
    rewards = torch.randn(batch, horizon, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, horizon, generator=gen, dtype=torch.float64)
    mask = prefix_mask(lengths, horizon)

    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    expected_adv, expected_ret = brute_force_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor(expected_adv, dtype=torch.float64))
    torch.testing.assert_close(returns, torch.tensor(expected_ret, dtype=torch.float64))


def test_orz_terminal_reward_identity() -> None:
    # ORZ: γ = λ = 1 and the 0/1 reward on the last token only. The δ's telescope:
    #   A_t = Σ_{k≥t} δ_k = Σ_{k≥t} (r_k + V_{k+1} − V_k) = r_T + V_{T+1} − V_t = r_T − V_t, and R_t = r_T.
    # By hand, row 0 (length 3, r_T = 1, V = [0.2, 0.5, 0.9]): A = [0.8, 0.5, 0.1], R = [1, 1, 1];
    # row 1 (length 2, r_T = 0, V = [0.3, −0.4]): A = [−0.3, 0.4], R = [0, 0], then padding.
    values = torch.tensor([[0.2, 0.5, 0.9, 0.0], [0.3, -0.4, 5.0, 5.0]], dtype=torch.float64)
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = prefix_mask([3, 2], 4)
    advantages, returns = compute_gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(
        advantages, torch.tensor([[0.8, 0.5, 0.1, 0.0], [-0.3, 0.4, 0.0, 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64))

    # The same identity on a random batch: terminal rewards r_T, any critic.
    gen = torch.Generator().manual_seed(7)
    lengths = [5, 1, 9, 3]
    values = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    terminal = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    rewards = torch.zeros(4, 9, dtype=torch.float64)
    rewards[torch.arange(4), torch.tensor(lengths) - 1] = terminal
    mask = prefix_mask(lengths, 9)
    advantages, returns = compute_gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(advantages, (terminal[:, None] - values) * mask)
    torch.testing.assert_close(returns, terminal[:, None] * mask)


def test_zero_where_masked_and_padding_ignored() -> None:
    gen = torch.Generator().manual_seed(3)
    lengths = [4, 0, 2, 6]
    rewards = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    values = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = prefix_mask(lengths, 6)
    advantages, returns = compute_gae(rewards, values, mask, 0.99, 0.95)
    assert advantages[mask == 0].eq(0).all() and returns[mask == 0].eq(0).all()

    # Junk (NaN, inf, huge numbers) in the padding changes nothing.
    pad = mask == 0
    junk_values = values.masked_fill(pad, float("nan"))
    junk_rewards = rewards.masked_fill(pad, float("inf"))
    junk_adv, junk_ret = compute_gae(junk_rewards, junk_values, mask, 0.99, 0.95)
    assert torch.equal(junk_adv, advantages) and torch.equal(junk_ret, returns)


def test_no_gradient_and_shapes() -> None:
    values = torch.randn(2, 3, requires_grad=True)
    advantages, returns = compute_gae(torch.zeros(2, 3), values, torch.ones(2, 3), 1.0, 1.0)
    assert advantages.shape == returns.shape == (2, 3)
    assert not advantages.requires_grad and not returns.requires_grad


def test_masked_mean() -> None:
    # Valid entries 1, 2, 3, 6: mean 12 / 4 = 3. Per row: (1 + 2) / 2 = 1.5 and (3 + 6) / 2 = 4.5.
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, 6.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert masked_mean(x, mask).item() == 3.0
    assert masked_mean(x, mask, dim=1).tolist() == [1.5, 4.5]
    assert masked_mean(x, mask, dim=0).tolist() == [2.0, 4.0, 0.0]  # an empty column gives 0, not NaN
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_whiten() -> None:
    # Valid entries 1, 2, 3, 6: mean 3; population variance (4 + 1 + 0 + 9) / 4 = 3.5;
    # whitened = (x − 3) / √3.5, and the padded entries stay exactly 0.
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, 6.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    out = masked_whiten(x, mask)
    s = math.sqrt(3.5)
    torch.testing.assert_close(out, torch.tensor([[-2 / s, -1 / s, 0.0], [0.0, 3 / s, 0.0]], dtype=torch.float64))
    assert abs(masked_mean(out, mask).item()) < 1e-12
    assert masked_mean(out**2, mask).item() == pytest.approx(1.0)

    # A constant batch (every advantage equal) has zero variance: eps keeps it finite, all zeros.
    const = masked_whiten(torch.full((2, 3), 0.75), torch.ones(2, 3))
    assert torch.equal(const, torch.zeros(2, 3))

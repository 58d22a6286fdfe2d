"""PNG of the training curves: reward and response length per learner step."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_curves(history: list[dict], out: Path) -> None:
    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (("reward_mean", "mean reward (accuracy of samples)"), ("response_len_mean", "response length (tokens)"),
              ("staleness_mean", "staleness (versions)"))
    for ax, (key, title) in zip(axes, panels):
        ax.plot(steps, [r[key] for r in history], marker=".", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)

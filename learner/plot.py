"""PNG of the training curves: reward and response length per learner step."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from services.metrics import window_means, window_steps  # noqa: E402


def plot_curves(history: list[dict], out: Path) -> None:
    """Reward, response length and staleness per step; the reward and length panels also mark the mean of
    the first and the last 10 steps (the figures `orz up` prints at the end)."""
    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (("reward_mean", "mean reward (accuracy of samples)"), ("response_len_mean", "response length (tokens)"),
              ("staleness_mean", "staleness (versions)"))
    k = window_steps(len(history))
    for ax, (key, title) in zip(axes, panels):
        ax.plot(steps, [r[key] for r in history], marker=".", linewidth=1)
        if key != "staleness_mean" and history:
            first, last = window_means(history, key)
            ax.hlines(first, steps[0], steps[k - 1], colors="tab:red", linewidth=2, label=f"first {k}: {first:.3g}")
            ax.hlines(last, steps[-k], steps[-1], colors="tab:green", linewidth=2, label=f"last {k}: {last:.3g}")
            ax.legend(loc="best", fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_comparison(runs: dict[str, list[dict]], out: Path, window: int = 5) -> None:
    """Several runs on shared axes (e.g. PPO-GAE against GRPO, or max_staleness 0/2/4): train reward,
    held-out accuracy (the in-training evaluation, `learner.eval_every`; the panel is left out when no run
    has one), response length and mean staleness per step. Per-step values are drawn thin, a `window`-step
    moving average thick."""
    panels = [("reward_mean", "mean train reward"), ("eval_accuracy", "held-out accuracy"),
              ("response_len_mean", "response length (tokens)"), ("staleness_mean", "staleness (versions)")]
    panels = [(k, t) for k, t in panels if any(r.get(k) is not None for h in runs.values() for r in h)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8))
    for ax, (key, title) in zip(axes, panels):
        for label, history in runs.items():
            points = [(r["step"], r[key]) for r in history if r.get(key) is not None]
            if not points:
                continue
            steps, values = [p[0] for p in points], [p[1] for p in points]
            if key == "eval_accuracy":  # sparse: every eval_every steps, drawn as measured
                ax.plot(steps, values, marker="o", markersize=3, linewidth=1.6, label=label)
                continue
            smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                      for i in range(len(values))]
            (line,) = ax.plot(steps, smooth, linewidth=1.6, label=label)
            ax.plot(steps, values, linewidth=0.6, alpha=0.35, color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    # One legend for all panels, under them: long run labels would otherwise squeeze the axes.
    handles, labels = axes[0].get_legend_handles_labels()
    ncol = 1 if max(map(len, labels), default=0) > 60 else 2
    rows = -(-len(labels) // ncol)
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height + 0.3 * rows)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False)
    fig.tight_layout(rect=(0, 0.3 * rows / (height + 0.3 * rows), 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)

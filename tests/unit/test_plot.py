"""`orz plot`: one panel per quantity any run has; the held-out accuracy panel only when a run evaluated."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from learner.plot import plot_comparison


def _history(n: int, eval_every: int | None) -> list[dict]:
    return [{"step": i, "reward_mean": i / n, "response_len_mean": 20 + i, "staleness_mean": 1.0,
             "eval_accuracy": (i / n if eval_every and i % eval_every == 0 else None)} for i in range(1, n + 1)]


def test_panels_follow_the_runs(tmp_path: Path) -> None:
    plot_comparison({"a": _history(30, 10), "b": _history(30, None)}, tmp_path / "with_eval.png")
    plot_comparison({"a": _history(30, None), "b": _history(20, None)}, tmp_path / "without_eval.png")
    with Image.open(tmp_path / "with_eval.png") as a, Image.open(tmp_path / "without_eval.png") as b:
        assert a.size[0] == 4 * 520 and b.size[0] == 3 * 520  # 5.2 in per panel at 100 dpi
        assert a.size[1] == b.size[1] == 380 + 30  # 3.8 in, plus 0.3 in for the one legend row under them


def test_first_and_last_ten_steps_are_what_the_plot_and_the_summary_report(tmp_path: Path) -> None:
    from learner.plot import plot_curves
    from services.metrics import window_means
    from services.stack import _summary

    history = [{"step": i, "reward_mean": 0.25 if i <= 50 else 0.75, "response_len_mean": float(i),
                "staleness_mean": 1.0, "step_time_s": 1.0, "train_s": 0.5, "dropped_stale_total": 0,
                "task_ids": ["t"] * 16} for i in range(1, 101)]
    assert window_means(history, "reward_mean") == (0.25, 0.75)
    assert window_means(history, "response_len_mean") == (5.5, 95.5)  # mean of 1..10, of 91..100
    s = _summary(history, 100.0)
    assert s["window_steps"] == 10
    assert (s["reward_first_steps"], s["reward_last_steps"]) == (0.25, 0.75)
    assert (s["response_len_first_steps"], s["response_len_last_steps"]) == (5.5, 95.5)
    short = _summary(history[:6], 6.0)  # a short run: half of it on each side
    assert short["window_steps"] == 3 and short["response_len_first_steps"] == 2.0
    assert short["response_len_last_steps"] == 5.0
    plot_curves(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000

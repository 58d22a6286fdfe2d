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
        assert a.size[1] == b.size[1] == 380

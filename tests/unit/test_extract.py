"""ORZ-style answer extraction (reward_server/extract.py): semantics, caps, and linear time on hostile text."""

from __future__ import annotations

import time

import pytest

from reward_server.extract import MAX_ANSWER_CHARS, MAX_BRACE_DEPTH, answer_block, extract_answer, last_boxed_content


@pytest.mark.parametrize(
    ("response", "orz", "fallback"),
    [
        ("<think> 7+5=12 </think> <answer>\\boxed{12}</answer>", "12", "12"),
        # the last boxed inside the last answer block wins
        ("<answer>\\boxed{1}</answer> retry <answer>\\boxed{2} or \\boxed{3}</answer>", "3", "3"),
        # a boxed after the answer block does not override the block
        ("<answer>\\boxed{4}</answer> \\boxed{5}", "4", "4"),
        # no boxed inside the block: ORZ scores 0; the fallback takes the last boxed anywhere
        ("<think>\\boxed{6} then \\boxed{7}</think><answer>7</answer>", None, "7"),
        # a boxed answer in <think> and no answer block at all
        ("<think>1+1 = \\boxed{2}</think>", None, "2"),
        # no </answer> (the stop string was not kept): ORZ scores 0
        ("<think>1+1</think> <answer>\\boxed{2}", None, "2"),
        ("The answer is \\boxed{\\frac{1}{2}}.", None, "\\frac{1}{2}"),
    ],
)
def test_orz_rule_and_the_fallback(response: str, orz: str | None, fallback: str) -> None:
    assert extract_answer(response) == orz  # ORZ's rule is the default (reward.math_fallback_boxed: false)
    assert extract_answer(response, fallback_boxed=True) == fallback


@pytest.mark.parametrize(
    ("boxed", "expected"),
    [
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\dfrac{\\sqrt{3}}{2}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are literal LaTeX braces
        ("\\boxed{ 42 }", "42"),
        ("\\boxed {42}", "42"),
        ("\\fbox{9}", "9"),
        ("\\boxed{\\boxed{8}}", "8"),  # the innermost is the last one to start
    ],
)
def test_boxed_contents(boxed: str, expected: str) -> None:
    assert extract_answer(f"<answer>{boxed}</answer>") == expected
    assert extract_answer(boxed, fallback_boxed=True) == expected


@pytest.mark.parametrize(
    "response",
    [
        "",
        "<think>no box</think><answer>12</answer>",
        "<answer>\\boxed{12</answer>",  # unclosed
        "\\boxed{1} and then \\boxed{2",  # the last one is unclosed: ORZ scores it 0, no earlier fallback
        "\\boxed{}",
        "\\boxed{   }",
        "\\boxed 5",  # not braced
        "\\boxedx{5}",  # a different command
    ],
)
def test_no_answer(response: str) -> None:
    assert extract_answer(response) is None
    assert extract_answer(response, fallback_boxed=True) is None


def test_answer_block_is_the_last_closed_one() -> None:
    assert answer_block("<answer>a</answer><answer>b</answer>") == "b"
    assert answer_block("<answer>a") is None
    assert answer_block("a</answer>") is None


def test_length_cap() -> None:
    at_cap = "1" * MAX_ANSWER_CHARS
    assert extract_answer(f"<answer>\\boxed{{{at_cap}}}</answer>") == at_cap
    assert extract_answer(f"<answer>\\boxed{{{at_cap}1}}</answer>") is None
    assert last_boxed_content("\\boxed{12345}", max_chars=4) is None
    assert last_boxed_content("\\boxed{1234}", max_chars=4) == "1234"


def test_depth_cap() -> None:
    ok = "{" * (MAX_BRACE_DEPTH - 1) + "x" + "}" * (MAX_BRACE_DEPTH - 1)
    assert extract_answer(f"<answer>\\boxed{{{ok}}}</answer>") == ok
    too_deep = "{" * MAX_BRACE_DEPTH + "x" + "}" * MAX_BRACE_DEPTH
    assert extract_answer(f"<answer>\\boxed{{{too_deep}}}</answer>") is None


def test_10k_deep_braces_is_fast_and_capped() -> None:
    response = "<answer>\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}</answer>"
    t0 = time.perf_counter()
    assert extract_answer(response) is None
    assert time.perf_counter() - t0 < 0.05


def test_one_megabyte_responses_are_linear() -> None:
    long_text = "blah " * 200_000
    many_boxes = "\\boxed{1} " * 100_000
    unclosed = "\\boxed{" + "1" * 1_000_000
    t0 = time.perf_counter()
    assert extract_answer(long_text + "<answer>\\boxed{42}</answer>") == "42"
    assert extract_answer(long_text) is None
    assert extract_answer(many_boxes + "\\boxed{2}", fallback_boxed=True) == "2"
    assert extract_answer(many_boxes + "\\boxed{2}") is None
    assert extract_answer(unclosed, fallback_boxed=True) is None
    assert extract_answer("<answer>" * 100_000 + "</answer>" * 100_000) is None
    assert time.perf_counter() - t0 < 0.5

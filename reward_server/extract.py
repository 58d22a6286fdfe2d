"""Final-answer extraction, ORZ style: the last `\\boxed{…}` inside the last `<answer>…</answer>`.

Runs in the reward server's parent process on untrusted model text, so it must stay linear in the response
length: `str.rfind` locates the block and the last `\\boxed`, and brace matching scans at most
`max_chars` characters after it. Only the extracted content ever reaches math-verify
(long free text triggers super-linear backtracking in math-verify's regexes; deep nesting hangs ANTLR).

ORZ (playground/orz_7b_ppo.py) takes the last `<answer>.*?(\\boxed{.*}).*?</answer>` match, then
`last_boxed_only_string`, and a response without one scores 0: the pressure toward the format ORZ relies on.
That is the default here. `reward.math_fallback_boxed: true` falls back to the last `\\boxed` anywhere (for
models or prompts that do not write the answer block).
"""

from __future__ import annotations

MAX_ANSWER_CHARS = 1000  # longer boxed contents score 0: no real answer is that long, hostile ones are
MAX_BRACE_DEPTH = 50  # nesting past this scores 0 (math-verify needs > 16 s on 1k-deep braces)

_OPEN_TAG, _CLOSE_TAG = "<answer>", "</answer>"
_BOX_COMMANDS = ("\\boxed", "\\fbox")


def answer_block(response: str) -> str | None:
    """The text of the last closed `<answer>…</answer>` block, or None."""
    end = response.rfind(_CLOSE_TAG)
    if end < 0:
        return None
    start = response.rfind(_OPEN_TAG, 0, end)
    if start < 0:
        return None
    return response[start + len(_OPEN_TAG) : end]


def last_boxed_content(
    text: str, max_chars: int = MAX_ANSWER_CHARS, max_depth: int = MAX_BRACE_DEPTH
) -> str | None:
    """Content of the last `\\boxed{…}` (or `\\fbox{…}`) in `text`, by brace matching.

    None when there is none, when the last one is not followed by `{`, is unclosed, holds more than
    `max_chars` characters or nests braces deeper than `max_depth`, or is empty. A backslash escapes the
    next character, so `\\{` and `\\}` (literal braces in LaTeX) do not count.
    """
    cmd_at, cmd = max((text.rfind(cmd), cmd) for cmd in _BOX_COMMANDS)
    if cmd_at < 0:
        return None
    i = cmd_at + len(cmd)
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    start = i + 1
    stop = min(len(text), start + max_chars + 1)  # one past the cap: a brace there still closes in time
    depth = 1
    i = start
    while i < stop:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
            if depth > max_depth:
                return None
        elif ch == "}":
            depth -= 1
            if depth == 0:
                content = text[start:i].strip()
                return content if 0 < i - start <= max_chars and content else None
        i += 1
    return None


def extract_answer(
    response: str, max_chars: int = MAX_ANSWER_CHARS, max_depth: int = MAX_BRACE_DEPTH, fallback_boxed: bool = False
) -> str | None:
    """The answer the reward is computed on: the last boxed in the last `<answer>` block (ORZ); with
    `fallback_boxed`, else the last boxed anywhere."""
    block = answer_block(response)
    if block is not None:
        found = last_boxed_content(block, max_chars, max_depth)
        if found is not None:
            return found
    return last_boxed_content(response, max_chars, max_depth) if fallback_boxed else None

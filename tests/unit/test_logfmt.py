"""One line per log record off a terminal, in text and in JSON (services/logfmt.py), through the root
logger exactly as every `orz` process configures it."""

from __future__ import annotations

import io
import json
import logging

import pytest

from services.logfmt import configure


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _log_with_traceback() -> None:
    log = logging.getLogger("orz.test")
    log.info("first line\nsecond line")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")


def test_text_off_a_terminal_is_one_line_per_record() -> None:
    out = io.StringIO()
    configure("learner", "text", out)
    _log_with_traceback()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(" learner orz.test INFO first line\\nsecond line")
    assert "it failed\\nTraceback (most recent call last):" in lines[1] and "ValueError: boom" in lines[1]


def test_text_on_a_terminal_keeps_the_traceback_readable() -> None:
    out = _Tty()
    configure("learner", "text", out)
    _log_with_traceback()
    assert "\nsecond line\n" in out.getvalue() and "\nValueError: boom\n" in out.getvalue()


def test_json_is_one_object_per_line() -> None:
    out = _Tty()  # JSON is one line even on a terminal
    configure("generator", "json", out)
    _log_with_traceback()
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [d["message"] for d in docs] == ["first line\nsecond line", "it failed"]
    assert {d["process"] for d in docs} == {"generator"} and docs[1]["level"] == "ERROR"
    assert docs[1]["exc"].endswith("ValueError: boom") and docs[0]["time"].endswith("+00:00")
    assert "exc" not in docs[0]

"""Log records as people and log shippers read them: one line per record.

`text` (default): `HH:MM:SS process logger LEVEL message`. On a terminal a multi-line message (a traceback)
keeps its lines; off a terminal (log files, CI, containers) its newlines are written as `\\n`, so every record
is one line and a line-oriented reader never sees half a record. `json` (`logging.format: json`): one JSON
object per line, with `ts` (epoch seconds), `time` (ISO 8601, UTC), `process`, `logger`, `level`, `message`
and, when there is one, `exc`. vLLM's loggers are routed through the same handler
(`VLLM_CONFIGURE_LOGGING=0`), so its lines follow the same format.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from typing import IO

QUIET = ("httpx", "urllib3", "matplotlib")


class LineFormatter(logging.Formatter):
    def __init__(self, process: str, one_line: bool) -> None:
        super().__init__(f"%(asctime)s {process} %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
        self.one_line = one_line

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.replace("\r", "").replace("\n", "\\n") if self.one_line else text


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 3),
               "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
               "process": self.process, "logger": record.name, "level": record.levelname,
               "message": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure(process: str, fmt: str = "text", stream: IO[str] | None = None) -> None:
    """The root logger writes to `stream` (stdout) in `fmt`; called again once the config is loaded."""
    stream = stream or sys.stdout
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM's records reach this handler
    handler = logging.StreamHandler(stream)
    tty = hasattr(stream, "isatty") and stream.isatty()
    handler.setFormatter(JsonFormatter(process) if fmt == "json" else LineFormatter(process, one_line=not tty))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)

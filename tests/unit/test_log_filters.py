"""vLLM's harmless RotaryEmbedding reload warning is dropped, and nothing else is (generator/engine.py)."""

from __future__ import annotations

import logging

from generator.engine import RELOAD_LOGGER, RotaryReloadFilter


def _record(*args: str) -> logging.LogRecord:
    return logging.LogRecord(RELOAD_LOGGER, logging.WARNING, "layerwise.py", 266, "%s: Failed to load weights",
                             args, None)


def test_only_the_rotary_embedding_reload_warning_is_dropped() -> None:
    f = RotaryReloadFilter()
    assert f.filter(_record("RotaryEmbedding")) is False
    assert f.filter(_record("QKVParallelLinear")) is True  # a real missing weight still warns
    assert f.filter(logging.LogRecord(RELOAD_LOGGER, logging.WARNING, "x", 1, "other", (), None)) is True
    assert any(isinstance(x, RotaryReloadFilter) for x in logging.getLogger(RELOAD_LOGGER).filters)

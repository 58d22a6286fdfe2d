"""The house rules, enforced: process packages talk only through `services/`, none of them calls Redis past
`services/` (the queues and the control plane), no source file grows past 400 lines, and nothing in the
repository points at files a clone does not have."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROCESS_PACKAGES = ("learner", "generator", "reward_server")
PACKAGES = (*PROCESS_PACKAGES, "services")
COMPOSITION_ROOT = {"services/cli.py"}  # `orz <command>` imports the process it runs, and nothing else may
MAX_LINES = 400
# Redis commands (redis-py method names) that only services/ may call.
REDIS_CALLS = {"get", "set", "delete", "exists", "hset", "hget", "hgetall", "hdel", "hlen", "xadd", "xrange",
               "xrevrange", "xreadgroup", "xack", "xclaim", "xautoclaim", "xpending", "xpending_range", "xtrim",
               "xinfo_groups", "xgroup_create", "xlen", "publish", "pipeline", "incr", "info", "expire", "keys"}


def _sources(packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level package) of every import, at any depth (a function-level import counts too)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def test_process_packages_import_only_services() -> None:
    breaches = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        own = rel.split("/")[0]
        for line, top in _imports(ast.parse(path.read_text(), rel)):
            if top not in PROCESS_PACKAGES or top == own:
                continue
            if own == "services" and rel in COMPOSITION_ROOT:
                continue
            breaches.append(f"{rel}:{line} imports {top}")
    assert not breaches, "\n".join(breaches)


def _redis_receiver(node: ast.expr) -> bool:
    """`redis.<cmd>(…)`, `self.redis.<cmd>(…)`, `client.<cmd>(…)`: a call on a Redis client."""
    if isinstance(node, ast.Name):
        return node.id in ("redis", "client")
    return isinstance(node, ast.Attribute) and node.attr in ("redis", "client")


def test_no_process_package_calls_redis_directly() -> None:
    breaches = []
    for path in _sources(PROCESS_PACKAGES):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in REDIS_CALLS and _redis_receiver(node.func.value)):
                breaches.append(f"{rel}:{node.lineno} calls Redis {node.func.attr}() (use services/queue.py or "
                                "services/control.py)")
    assert not breaches, "\n".join(breaches)


def test_the_rule_catches_a_breach(tmp_path: Path) -> None:
    """The checks above see what they are meant to: a nested import and a direct call."""
    tree = ast.parse("def f(self):\n    from generator.engine import X\n    self.redis.hset('k', 'f', 1)\n")
    assert (2, "generator") in _imports(tree)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr in REDIS_CALLS and _redis_receiver(n.func.value)]
    assert len(calls) == 1


@pytest.mark.parametrize("path", _sources(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_source_file_over_400_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}): split it"


def test_nothing_points_outside_the_repository() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    breaches = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.suffix in (".png", ".jsonl", ".parquet", ".gz", ".safetensors"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for needle in ("../" + "shared", "ARCHITECTURE" + ".md", "STYLE" + ".md"):
            if needle in text:
                breaches.append(f"{name} cites {needle}, which a clone does not have")
    assert not breaches, "\n".join(breaches)

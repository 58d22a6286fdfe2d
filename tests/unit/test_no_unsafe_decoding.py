"""Nothing that crossed a process boundary is unpickled, evaluated or handed to sympy's parser: the source
tree is scanned (as syntax, not text) for the calls that would do it, and every use that remains is on an
allow-list that says why it is safe."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "generator", "learner", "reward_server", "bench", "tests")

BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}
BUILTINS = {"eval", "exec", "compile", "__import__"}  # as bare names: `model.eval()` and `re.compile` are fine
PARSERS = {"sympify", "parse_expr", "parse_latex"}  # sympy's, which eval their input; under any name

# (file, what) → why it is safe. Keep this short; every entry is a reviewed exception.
ALLOWED: dict[tuple[str, str], str] = {
    ("reward_server/grading.py", "ProcessPool"): (
        "pebble pickles (grader name, reference, extracted answer, timeout) to its own forked workers and a "
        "(verdict, detail) pair of strings back, over pipes it opened itself; the strings are data to "
        "math-verify, which parses LaTeX and only calls parse_expr on a digit/operator regex; the workers cannot "
        "open a file or socket (reward_server/sandbox.py: seal_descriptors)"),
    ("bench/reward.py", "ProcessPool"): "the benchmark's bare-pool baseline: the same pebble pool as the server's",
}


def _findings(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            found.append((node.lineno, node.module or ""))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if (name in BUILTINS and isinstance(func, ast.Name)) or name in PARSERS:
                found.append((node.lineno, name))
            if name == "ProcessPool":
                found.append((node.lineno, name))
            if name == "load" and isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                kwargs = {k.arg: k.value for k in node.keywords}
                if func.value.id == "torch" and not (isinstance(kwargs.get("weights_only"), ast.Constant)
                                                     and kwargs["weights_only"].value is True):
                    found.append((node.lineno, "torch.load without weights_only=True"))
                if func.value.id == "yaml":
                    found.append((node.lineno, "yaml.load (use yaml.safe_load)"))
            if name in ("run", "Popen", "call", "check_output", "check_call") and any(
                    k.arg == "shell" and isinstance(k.value, ast.Constant) and k.value.value for k in node.keywords):
                found.append((node.lineno, "subprocess with shell=True"))
    return found


def test_no_unpickling_eval_or_sympy_parsing_outside_the_allow_list() -> None:
    offenders = []
    used = set()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for line, what in _findings(path):
                if (rel, what) in ALLOWED:
                    used.add((rel, what))
                else:
                    offenders.append(f"{rel}:{line}: {what}")
    assert not offenders, "unsafe decoding of data from another process:\n" + "\n".join(offenders)
    assert used == set(ALLOWED), f"allow-list entries no longer needed: {set(ALLOWED) - used}"


def test_the_scan_finds_what_it_bans(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nfrom dill import loads\nimport torch, yaml, subprocess\neval(x)\nexec(x)\n"
                   "sympy.sympify(x)\nparse_expr(x)\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
                   "yaml.load(s)\nsubprocess.run(c, shell=True)\n")
    found = [what for _, what in _findings(bad)]
    assert found.count("torch.load without weights_only=True") == 2
    for what in ("pickle", "dill", "eval", "exec", "sympify", "parse_expr", "yaml.load (use yaml.safe_load)",
                 "subprocess with shell=True"):
        assert what in found, what
    good = tmp_path / "good.py"
    good.write_text("import torch, yaml, json, re\ntorch.load(p, weights_only=True)\nyaml.safe_load(s)\n"
                    "json.loads(s)\nmodel.eval()\nre.compile(r)\n")
    assert _findings(good) == []

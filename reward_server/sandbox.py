"""Isolation of the grading workers, and the check that it never changes a verdict.

A grading worker parses model text with math-verify and sympy. It is sealed: it cannot open a file, a socket
or a pipe (RLIMIT_NOFILE at its lowest free descriptor) and its address space is capped (RLIMIT_AS). Model
text that steered a parser bug could therefore still not read, write or reach anything.

The seal alone broke grading. sympy imports many of its modules on first use (`sympy/core/add.py` imports
`sympy.tensor.tensor` inside a function), an import needs a file descriptor, and math-verify catches the
resulting `OSError: [Errno 24]` and answers False: correct answers such as `x^2+2x+1` for `(x+1)^2` came back
`wrong`. Two things make that impossible now:

- `preload_grading_modules()` imports, in the server process before its pool forks, every module of the
  packages grading runs in (sympy, mpmath, latex2sympy2_extended, math_verify, antlr4): about 480 modules
  beyond what the server already holds, 0.9 s and 28 MB once, shared copy-on-write by every worker. A lazy
  import inside those packages then finds its module loaded and needs no file.
- `fault_watch()` arms an audit hook (PEP 578) around each comparison. An import of a module that is not
  loaded yet, a file or directory opened, a socket or a process started: each is a sign that the sealed
  worker could not do what a plain process would have done, so the comparison's outcome is not trusted and
  the verdict is `error` (retried by the generator, counted, alerted on), never `wrong`.

A differential test (tests/integration/test_grading_differential.py) grades thousands of generated pairs over
HTTP and in a plain process and finds the same verdict for every one.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pkgutil
import resource
import sys
import time
import warnings
from collections.abc import Iterator

log = logging.getLogger("orz.reward.sandbox")

# The packages a comparison runs in. Each of their modules is imported before the seal.
GRADING_PACKAGES = ("sympy", "mpmath", "latex2sympy2_extended", "math_verify", "antlr4")
# Modules of those packages not imported: test suites, one that prints a poem on import, one that only
# raises, pyglet plotting (needs a display), and math-verify's lighteval task (needs lighteval and numpy).
_SKIPPED_PARTS = (".tests", ".benchmarks", ".conftest")
_SKIPPED = ("sympy.this", "sympy.galgebra", "sympy.plotting.pygletplot", "math_verify.tasks")

# Audit events that mean a sealed worker tried something it cannot do (the import of a module not yet
# loaded, a file, a directory listing, a socket, a new process).
_FAULT_EVENTS = frozenset({"import", "open", "os.listdir", "os.scandir", "os.system", "os.posix_spawn",
                           "os.fork", "os.forkpty", "subprocess.Popen", "shutil.copyfile"})
_FAULT_PREFIXES = ("socket.", "os.exec")
MAX_FAULTS_KEPT = 4


class _ForeignImportBlock:
    """A meta-path finder that refuses, while preloading, packages outside the grading ones and those already
    loaded: walking sympy must not pull in numpy, matplotlib or pytest through its optional integrations."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed

    def find_spec(self, name: str, path=None, target=None):  # noqa: ANN001 (importlib's finder protocol)
        top = name.partition(".")[0]
        if top in self.allowed or top in sys.stdlib_module_names:
            return None  # not ours to decide: the normal finders load it
        raise ImportError(f"{name} is not imported before the grading seal")


def preload_grading_modules() -> tuple[int, float]:
    """Imports every module of `GRADING_PACKAGES`; returns (modules newly imported, seconds)."""
    t0 = time.perf_counter()
    before = len(sys.modules)
    block = _ForeignImportBlock(set(GRADING_PACKAGES) | {m.partition(".")[0] for m in sys.modules})
    sys.meta_path.insert(0, block)
    failed: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices of modules nobody imports on purpose
            for package in GRADING_PACKAGES:
                root = importlib.import_module(package)
                for info in pkgutil.walk_packages(root.__path__, package + ".", onerror=lambda name: None):
                    name = info.name
                    if any(part in name for part in _SKIPPED_PARTS) or name.startswith(_SKIPPED):
                        continue
                    try:
                        importlib.import_module(name)
                    except Exception as exc:  # an optional integration (its library is absent or refused)
                        failed.append(f"{name} ({type(exc).__name__})")
    finally:
        sys.meta_path.remove(block)
    if failed:
        log.debug("not preloaded: %s", ", ".join(failed))
    return len(sys.modules) - before, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# Inside a worker.

_START_VM_MB = float("nan")
_armed = False
_faults: list[str] = []


def init_worker(mem_mb: int) -> None:
    """Caps the worker's address space (a short answer can reach 400-560 MB within seconds), watches for
    faults and takes away its file and network access."""
    limit = mem_mb << 20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    global _START_VM_MB
    _START_VM_MB = worker_vm_mb()  # read now: /proc is out of reach once sealed
    sys.addaudithook(_audit)
    seal_descriptors()


def seal_descriptors() -> None:
    """No new file descriptor from here on: RLIMIT_NOFILE (soft and hard) at the lowest free descriptor number,
    so `open`, `socket`, `pipe` and `accept` all fail with EMFILE. A grader reads model text and writes a
    verdict over the pipes pebble opened before this ran. Lowering the hard limit cannot be undone without
    CAP_SYS_RESOURCE. Imports need files: everything grading imports is loaded before the pool forks
    (`preload_grading_modules`), and `fault_watch` turns any import it missed into the verdict `error`."""
    open_fds = {int(fd) for fd in os.listdir("/proc/self/fd")}  # includes the listing's own, closed by now
    highest = max(open_fds)
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest, highest))
    while True:  # fill any hole below the limit with /dev/null, so not even one descriptor is left to take
        try:
            os.open(os.devnull, os.O_RDONLY)
        except OSError:
            break


def worker_vm_mb() -> float:
    """The worker's current address-space size (VmSize), to show the headroom left under RLIMIT_AS."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_vm_mb() -> float:
    """VmSize of this worker when it was sealed (a pool task: the parent logs the headroom)."""
    return _START_VM_MB


def _audit(event: str, args: tuple) -> None:
    if not _armed or not (event in _FAULT_EVENTS or event.startswith(_FAULT_PREFIXES)):
        return
    if event == "open" and isinstance(args[0], int):
        return  # wraps a descriptor the worker already holds (no new one)
    what = f"{event} {args[0] if args else ''}"[:200]
    if len(_faults) < MAX_FAULTS_KEPT and what not in _faults:
        _faults.append(what)


@contextlib.contextmanager
def fault_watch() -> Iterator[list[str]]:
    """Collects, while the block runs, what the sealed worker tried and could not do (see `_FAULT_EVENTS`).
    Outside a sealed worker no hook is installed and the list stays empty."""
    global _armed
    _faults.clear()
    _armed = True
    try:
        yield _faults
    finally:
        _armed = False


def is_grader_fault(exc: BaseException) -> bool:
    """True when `exc`, or an exception it was raised from, is about the grader rather than the answer: a
    missing module, a file or descriptor error, memory exhausted. math-verify re-raises with `raise e from e`,
    so the chain is followed."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ImportError | OSError | MemoryError):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False

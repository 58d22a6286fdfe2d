"""orz up's restart policy (services/supervise.py): doubling backoff with a cap, a restart count per child,
and a clear end once a child has used its restarts or restarts are off. The e2e test
tests/e2e/test_supervise.py kills real children of a real `orz up`."""

from __future__ import annotations

import pytest

from services.config import StackConfig
from services.supervise import StackError, Supervisor


class _Child:
    def __init__(self, name: str) -> None:
        self.name, self.running, self.starts = name, True, 1

    def alive(self) -> bool:
        return self.running

    @property
    def returncode(self) -> int | None:
        return None if self.running else -9

    def restart(self) -> None:
        self.running, self.starts = True, self.starts + 1

    def tail(self) -> str:
        return "last log line"


def test_backoff_doubles_to_its_cap_and_the_restarts_run_out() -> None:
    now = [0.0]
    said: list[str] = []
    sup = Supervisor(StackConfig(max_restarts=4, restart_backoff_s=1.0, restart_backoff_max_s=5.0), said.append,
                     clock=lambda: now[0])
    assert [sup.delay(n) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    child = _Child("generator-0")
    for n, wait in enumerate((1.0, 2.0, 4.0, 5.0)):
        child.running = False
        sup.poll(child)  # death noticed: restart scheduled, not yet done
        assert child.starts == n + 1 and said[-1] == f"generator-0 exited with code -9; restarting it in {wait:.1f} s"
        now[0] += wait - 0.01
        sup.poll(child)
        assert child.starts == n + 1  # still backing off
        now[0] += 0.01
        sup.poll(child)
        assert child.starts == n + 2 and sup.restarts == {"generator-0": n + 1}
        sup.poll(child)  # alive: nothing to do
    child.running = False
    with pytest.raises(StackError, match=r"generator-0 exited with code -9 after 4 restarts .*\nlast log line"):
        sup.poll(child)


def test_never_ends_the_run_at_the_first_death_with_the_hint() -> None:
    sup = Supervisor(StackConfig(restart="never"), lambda _msg: None)
    child = _Child("learner")
    child.running = False
    with pytest.raises(StackError, match=r"^learner exited with code -9:\nlast log line\nresume with"):
        sup.poll(child, give_up=lambda msg: msg + "\nresume with orz up --resume")
    assert child.starts == 1 and sup.restarts == {}


def test_the_resume_hint_repeats_the_command_with_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.stack import _resume_hint

    monkeypatch.setattr("sys.argv", ["/venv/bin/orz", "up", "-c", "configs/orz 7b.yaml", "--set", "a.b=1"])
    assert _resume_hint().endswith("orz up --resume -c 'configs/orz 7b.yaml' --set a.b=1")
    monkeypatch.setattr("sys.argv", ["/venv/bin/orz", "up", "--resume", "-c", "x.yaml"])
    assert _resume_hint().endswith("orz up --resume -c x.yaml")  # not twice

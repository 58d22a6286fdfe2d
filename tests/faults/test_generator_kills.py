"""kill -9 a generator while it holds prompts, three times in one run, each time restarting it under the same
id: its prompts stay pending in Redis, a live peer reclaims them after `claim_idle_ms`, and every task is
trained exactly once (`check_accounting`). Measures how long the dead generator's prompts took to be trained."""

from __future__ import annotations

import signal
import time

import pytest

from services.protocol import PromptTask
from services.queue import GENERATOR_GROUP
from tests.support.harness import Stack, check_accounting, recovery_s, write_report


def _held_by(client, stack: Stack, consumer: str) -> list[str]:
    """Task ids of the prompts delivered to `consumer` and not acknowledged."""
    pending = client.xpending_range(stack.keys.prompts, GENERATOR_GROUP, min="-", max="+", count=1000,
                                    consumername=consumer)
    ids = []
    for p in pending:
        entry = client.xrange(stack.keys.prompts, min=p["message_id"], max=p["message_id"])
        if entry:
            ids.append(PromptTask.from_bytes(entry[0][1][b"m"]).task_id)
    return ids


@pytest.mark.slow
def test_generator_killed_three_times(tmp_path) -> None:
    kills = []
    # No natural end: the three rounds take as long as the restarts do on this machine; the run is stopped after.
    with Stack(tmp_path, "kills", steps=10_000_000, batch=4) as stack:
        stack.wait_steps(2)
        client = stack.client()
        for round_ in range(3):
            gen = stack.generators[round_ % 2]
            held: list[str] = []

            def frozen_holding(gen=gen, held=held) -> bool:
                gen.signal(signal.SIGSTOP)  # freeze it, look in Redis, and kill it frozen if it holds prompts
                held[:] = _held_by(client, stack, gen.name)
                if held:
                    return True
                gen.signal(signal.SIGCONT)
                time.sleep(0.2)
                return False

            stack.wait(f"{gen.name} to hold prompts", frozen_holding, 120)
            t_kill = time.time()
            gen.signal(signal.SIGKILL)
            kills.append({"generator": gen.name, "at": t_kill, "held": list(held)})
            stack.wait_steps(len(stack.records()) + 2)
            gen.restart()  # comes back under the same id, like a restarted pod
            kills[-1]["restarted"] = time.time()

            def contributes(gen=gen, since=kills[-1]["restarted"]) -> bool:
                return any(r["time"] > since and gen.name in r["generator_ids"] for r in stack.records())

            kills[-1]["back_in_s"] = round(stack.wait(f"{gen.name} to train again", contributes, 180), 1)
        stack.wait_steps(len(stack.records()) + 5)
        stack.stop_learner()
        counts = check_accounting(stack, final="STOPPED")
        logs = [g.text() for g in stack.generators]

    records = stack.records()
    trained_at = {t: r["time"] for r in records for t in r["task_ids"]}
    ledger_dropped = counts["dropped_stale"]
    held_total = sum(len(k["held"]) for k in kills)
    assert held_total >= 3
    # every prompt a killed generator held was trained (or dropped as stale, counted) by someone else
    settled = [t for k in kills for t in k["held"] if t in trained_at]
    assert len(settled) + ledger_dropped >= held_total
    assert sum("reclaimed" in text for text in logs) >= 1  # taken over by XAUTOCLAIM
    assert all(text.count("generator gen-") >= 1 for text in logs)
    held_done = [max(trained_at[t] for t in k["held"] if t in trained_at) - k["at"] for k in kills
                 if any(t in trained_at for t in k["held"])]
    write_report("generator_kill", {
        "kills": len(kills), "prompts_held_at_kill": held_total, **counts,
        "next_step_s": [recovery_s(stack, k["at"]) for k in kills],
        "held_prompts_trained_within_s": [round(s, 1) for s in held_done],
        "claim_idle_ms": stack.cfg.redis.claim_idle_ms,
        "restarted_generator_trains_again_s": [k["back_in_s"] for k in kills],
    })

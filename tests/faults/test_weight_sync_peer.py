"""A weight-sync peer dies in the middle of a broadcast: generator 1 is frozen (SIGSTOP) so the learner's next
broadcasts stall on it, and killed once the learner has given up on it. The learner cuts the broadcast off at
`weight_sync.timeout_s`, re-forms the group with the generators still heartbeating and keeps training; the
peer, restarted later under the same id, rejoins and receives the current version before it samples."""

from __future__ import annotations

import re
import signal
import time

import pytest

from tests.support.harness import Stack, check_accounting, write_report


@pytest.mark.slow
def test_peer_dies_mid_broadcast_and_rejoins(tmp_path) -> None:
    with Stack(tmp_path, "wsync", steps=160, batch=4, overrides={"weight_sync": {"timeout_s": 5}}) as stack:
        stack.wait_steps(3)
        peer = stack.generators[1]
        learner = stack.learner
        peer.signal(signal.SIGSTOP)
        t_stop = time.time()
        stack.wait("the learner to give up on the frozen peer",
                   lambda: re.search(r"weight broadcast of v\d+ failed|stop broadcast failed", learner.text()), 60)
        t_failed = time.time()
        stack.wait("a group without the peer",
                   lambda: re.search(r"formed at \S+ with 1 generator\(s\) \['gen-0'\]", learner.text()[-20000:]),
                   60)
        t_regrouped = time.time()
        peer.signal(signal.SIGKILL)
        steps_at_kill = len(stack.records())
        stack.wait_steps(steps_at_kill + 10)  # the learner carries on with generator 0

        version_at_restart = stack.records()[-1]["policy_version"]
        peer.restart()
        t_restart = time.time()

        def rejoined() -> bool:
            return any(r["time"] > t_restart and "gen-1" in r["generator_ids"] for r in stack.records())

        stack.wait("the peer to contribute again", rejoined, 120)
        t_back = time.time()
        stack.finish()
        counts = check_accounting(stack)
        peer_log = peer.text()
        learner_log = learner.text()

    after = peer_log[peer_log.rfind("generator gen-1: metrics"):]  # the restarted process's log
    loaded = [int(v) for v in re.findall(r"loaded (?:weights|checkpoint) v(\d+)", after)]
    assert loaded and loaded[0] >= version_at_restart - 1, (loaded, version_at_restart)
    assert "joined weight-sync group" in after
    records = stack.records()
    late = [(r["step"], v) for r in records if r["time"] > t_restart
            for g, v in zip(r["group_generators"], r["group_versions"], strict=True) if g == "gen-1"]
    assert late and all(step - 1 - v <= stack.cfg.learner.max_staleness for step, v in late), late
    assert all(r["staleness_max"] <= stack.cfg.learner.max_staleness for r in records)
    assert "Traceback" not in learner_log
    write_report("weight_sync_peer", {
        "timeout_s": stack.cfg.weight_sync.timeout_s,
        "broadcast_given_up_after_s": round(t_failed - t_stop, 1),
        "regrouped_without_peer_after_s": round(t_regrouped - t_stop, 1),
        "steps_without_peer": 10, "rejoined_and_trained_after_restart_s": round(t_back - t_restart, 1),
        "first_version_loaded_after_restart": loaded[0], "learner_version_at_restart": version_at_restart,
        **counts})

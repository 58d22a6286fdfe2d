"""The "Failure modes" table of docs/failure-modes.md, from the JSON lines `make faults` writes (one per fault test):

    python bench/faults_table.py bench/results/faults-2026-11-25.jsonl [MORE.jsonl ...] [--readme]

Several files merge (a later file's report of a fault replaces an earlier one's). Prints the markdown table;
`--readme` also puts it between `<!-- faults:start -->` and `<!-- faults:end -->`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from readme_block import replace_block


def _span(values: list[float], unit: str = " s") -> str:
    lo, hi = min(values), max(values)
    return f"{lo:g}{unit}" if lo == hi else f"{lo:g}–{hi:g}{unit}"


def _lost(r: dict) -> str:
    return (f"nothing: {r['trained']} trained once, {r['inflight']} in flight and found in Redis, "
            f"{r['dropped_stale']} dropped as stale (counted), {r['duplicates']} duplicates dropped")


def rows(reports: dict[str, dict]) -> list[tuple[str, str, str, str]]:
    out = []
    if r := reports.get("generator_kill"):
        out.append((
            f"generator `kill -9` while holding prompts, {r['kills']}× in one run, restarted under its id "
            "(`test_generator_kills.py`)",
            "its prompts stay pending; a peer reclaims them after `claim_idle_ms`; weight sync re-forms with the "
            "generators that heartbeat after the failure; the restarted generator loads the newest checkpoint "
            "and rejoins",
            _lost(r),
            f"next learner step {_span(r['next_step_s'])} after the kill; the dead generator's prompts trained "
            f"{_span(r['held_prompts_trained_within_s'])} after it; the restarted one trains again after "
            f"{_span(r['restarted_generator_trains_again_s'])} (vLLM start-up)"))
    if r := reports.get("learner_kill"):
        out.append((
            "learner `kill -9` after a checkpoint, then `orz up --resume` (`tests/e2e/test_resume.py`)",
            "resumes from the newest complete checkpoint; the prompts in flight then are fed first; generators "
            "receive the resumed weights before the first step",
            f"the {r['steps_redone']} step(s) after the checkpoint are trained again; the same task set as an "
            "uninterrupted run, none twice",
            f"first step {r['resume_to_first_step_s']:g} s after `orz up --resume` (all processes restarted)"))
    if r := reports.get("learner_kill_alone"):
        out.append((
            "learner `kill -9` alone (Redis, reward server, generators keep running), restarted with `--resume` "
            "(`test_learner_restart.py`)",
            "it resumes from its newest checkpoint and resets the streams; generators take the resumed "
            "(older) weights; their samples from the lost versions are refused and those tasks fed again",
            f"the {r['steps_redone']} step(s) since the checkpoint (every {r['checkpoint_every']}) are trained "
            f"again; " + _lost(r) + f"; {r['learner_dead_lettered']} groups sampled from the lost versions "
            "dead-lettered, their tasks fed again",
            f"first step {r['restart_to_first_step_s']:g} s after the learner restarts"))
    if r := reports.get("redis_restart"):
        k, w = r["process_kill"], r["aof_window_lost"]
        out.append((
            f"Redis `kill -9`, down {k['down_s']:g} s, restarted from its AOF (`test_redis_restart.py`)",
            "every call retries with jittered backoff (`redis.retry_s`); the learner sees the new run_id and "
            "reconciles (nothing to do)",
            "nothing", f"first step {k['next_step_after_restart_s']:g} s after Redis is back"))
        out.append((
            f"Redis loses its last {w['writes_lost_s']:g} s of writes (AOF rolled back: a machine crash under "
            "`everysec`; same test), the generators frozen from the kill until the learner has reconciled",
            f"the learner feeds again the {w['prompts_refed']} in-flight prompts found in neither stream "
            + (f"(the {w['prompts_doomed']} fed after the snapshot and unanswered at the kill among them); "
               if "prompts_doomed" in w else "; ")
            + "reappearing groups and deliveries are dropped by task id",
            _lost(r), f"first step {w['next_step_after_restart_s']:g} s after Redis is back"))
    if r := reports.get("reward_outage"):
        h, d = r["one_replica_hung"], r["all_down"]
        out.append((
            "one of two reward replicas hangs (SIGSTOP) (`test_reward_outage.py`)",
            f"its requests time out after `request_timeout_s` ({r['request_timeout_s']:g} s); it is marked down "
            "and batches go to the other replica",
            "nothing", f"no pause: {h['steps_while_one_replica_hangs']} steps in the next {h['seconds']:g} s"))
        out.append((
            f"every reward replica down for {d['outage_s']:g} s (same test)",
            "generators back off (exponential, jittered, capped at 10 s; "
            f"{_span(r['attempts_per_generator_during_outage'], '')} attempts each), publish nothing ungraded, "
            "keep their prompts' leases; the learner waits",
            _lost(r) + f"; {d['steps_during_outage_after_8s']} steps during the outage",
            f"first step {d['next_step_after_restart_s']:g} s after a replica is back (≤ the backoff cap)"))
    if r := reports.get("weight_sync_peer"):
        out.append((
            "a weight-sync peer hangs mid-broadcast, then is killed (`test_weight_sync_peer.py`)",
            f"the broadcast is cut off at `weight_sync.timeout_s` ({r['timeout_s']:g} s), the group re-formed "
            "with the live generator; the peer, restarted under its id, rejoins with the current weights",
            _lost(r),
            f"broadcast abandoned {r['broadcast_given_up_after_s']:g} s after the hang, regrouped at "
            f"{r['regrouped_without_peer_after_s']:g} s; the restarted peer trains again "
            f"{r['rejoined_and_trained_after_restart_s']:g} s after its restart"))
    if r := reports.get("supervisor"):
        rec = r["recovery_s"]
        out.append((
            "`kill -9` of a generator, the reward server, the embedded Redis, then the learner, during one "
            "`orz up` (`tests/e2e/test_supervise.py`)",
            "`orz up` restarts each (`stack.restart: on-failure`, backoff from `stack.restart_backoff_s`): the "
            "generator under its id, the reward server on its port, Redis from its AOF, the learner with "
            "`--auto-resume`; the run goes on to `total_steps`",
            f"nothing: {r['trained']} trained once, none twice; the steps after the learner's checkpoint are "
            "trained again",
            "next step " + ", ".join(f"{rec[k]:g} s after the {k.replace('_', ' ')} kill" for k in rec)))
    if r := reports.get("multihost_generator_partition"):
        out.append((
            "a generator's host cut off from the network (link down), then healed (`tests/multihost`: every "
            "part on a host of its own)",
            "its leases lapse and a peer trains its prompts; the broadcast to it fails and the group re-forms "
            "without it; after the heal it rejoins the group with current weights",
            _lost(r),
            f"first step {r['first_step_after_cut_s']:g} s after the cut, 8 steps by {r['eight_steps_after_cut_s']:g}"
            f" s; trains again {r['rejoined_after_heal_s']:g} s after the heal"))
    if r := reports.get("multihost_delay_loss"):
        out.append((
            "200 ± 100 ms delay and 5 % frame loss on a generator's link (`tests/multihost`, a user-space "
            "netem: tests/support/wire.py)",
            "every broadcast waits for its slowest member: one over `weight_sync.slow_broadcast_s` makes the "
            f"learner time each member's link alone (64 KiB round trip: {r['gen0_round_trip_ms']} ms to the "
            f"slow generator, {r['fastest_round_trip_ms']} ms to the other) and leave the slow one out of weight "
            "sync for `slow_peer_cooldown_s`; its weights fall behind, so it stops taking prompts, and it is "
            "asked in again after the cooldown",
            _lost(r) + f"; {r['frames_dropped']} frames dropped; the slow generator's share of trained groups "
            f"{r['gen0_share_before']:g} → {r['gen0_share_after']:g}",
            f"left out {r['left_out_after_s']:g} s after the fault; {r['steps_per_min_before']:g} steps/min "
            f"before, {r['steps_per_min_during']:g} until then, {r['steps_per_min_after']:g} after (without the "
            "slow-peer check: 10 steps/min throughout); staleness "
            f"{r['staleness_before']:g} → {r['staleness_after']:g}"))
    if r := reports.get("multihost_learner_cut"):
        out.append((
            "the learner's host cut off from Redis for longer than `redis.retry_s` (`tests/multihost`)",
            "the learner's Redis calls give up after `redis.retry_s` and it exits with the error; after the "
            "heal, `--resume` continues from its checkpoint",
            _lost(r) + "; the steps after the checkpoint are trained again",
            f"learner stopped {r['learner_stopped_after_s']:g} s after the cut; first step "
            f"{r['first_step_after_resume_s']:g} s after the restart"))
    if r := reports.get("multihost_reward_cut"):
        out.append((
            "the reward server's host cut off for 20 s (`tests/multihost`)",
            "generators back off and retry, publish nothing ungraded; the learner waits",
            _lost(r) + f"; {r['steps_while_cut']} steps while cut off; 0 dead letters",
            f"first step {r['first_step_after_heal_s']:g} s after the heal"))
    if r := reports.get("poison"):
        out.append((
            f"{r['entries']} poison entries in both streams (garbage, wrong schema, wrong array lengths, NaN "
            "log-probs, absurd lengths, unknown tasks, wrong sample counts, …) (`test_poison.py`)",
            "each goes to the dead-letter stream with its reason; a rejected group's task is fed again",
            _lost(r) + f"; {r['dead_lettered']} of {r['entries']} dead-lettered", "no consumer stops"))
    return out


def table(reports: dict[str, dict]) -> str:
    lines = ["| fault | what happens | what is lost | recovery (measured) |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(reports)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, nargs="+")
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args()
    reports = {}
    for path in args.report:
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                reports[r["fault"]] = r
    text = table(reports)
    print(text)
    if args.readme:
        replace_block("faults", text)


if __name__ == "__main__":
    main()

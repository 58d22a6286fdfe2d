"""The Redis stream queue (services/queue.py) and the embedded server (services/redis_server.py),
against a real redis-server: delivery, takeover after a consumer dies, dead letters, housekeeping."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import redis

from services.control import Keys
from services.dead_letter import DeadLetter, dead_letters
from services.protocol import PromptTask, Sample, SamplingParams, TrajectoryGroup
from services.queue import GENERATOR_GROUP, StreamQueue, prompt_queue, trajectory_queue
from services.redis_client import connect
from services.redis_server import EmbeddedRedis, RedisServerError

NS = "orz:test"
KEYS = Keys(NS)


def task(i: int) -> PromptTask:
    return PromptTask(f"task-{i}", f"What is {i}+1?", str(i + 1), "math", 4, SamplingParams(), feed_version=0)


def group(i: int) -> TrajectoryGroup:
    sample = Sample(
        np.arange(i + 3, dtype=np.int32), np.linspace(-2, 0, i + 3, dtype=np.float32), 1.0, "stop", "x"
    )
    return TrajectoryGroup(f"task-{i}", np.array([7, 8], np.int32), (sample, sample), 2, "gen-0")


@pytest.fixture
def prompts(redis_client: redis.Redis) -> StreamQueue[PromptTask]:
    q = prompt_queue(redis_client, KEYS)
    q.ensure_group()
    return q


def ids_of(items: list[tuple[str, PromptTask]]) -> list[str]:
    return [msg.task_id for _, msg in items]


def test_keys_follow_the_documented_table() -> None:
    k = Keys("orz:run1")
    assert (k.prompts, k.trajectories, k.dead) == (
        "orz:run1:prompts",
        "orz:run1:trajectories",
        "orz:run1:dead",
    )
    assert (k.policy_version, k.generators, k.checkpoint, k.evals) == (
        "orz:run1:policy_version", "orz:run1:generators", "orz:run1:checkpoint", "orz:run1:evals",
    )  # fmt: skip
    assert k.weights_meta == "orz:run1:weights_meta"


def test_add_read_ack(prompts: StreamQueue[PromptTask]) -> None:
    added = prompts.add_many(task(i) for i in range(3)) + [prompts.add(task(3))]
    assert prompts.length() == 4 and prompts.backlog() == 4 and prompts.pending_count() == 0

    got = prompts.read("gen-a", count=10, block_ms=100)
    assert [entry_id for entry_id, _ in got] == added
    assert ids_of(got) == ["task-0", "task-1", "task-2", "task-3"]
    assert got[2][1] == task(2)
    assert prompts.backlog() == 0 and prompts.pending_count() == 4

    assert prompts.ack([entry_id for entry_id, _ in got[:3]]) == 3
    assert prompts.pending_count() == 1
    assert prompts.ack([got[3][0]]) == 1
    assert prompts.ack([got[3][0]]) == 0  # already acked
    assert prompts.pending_count() == 0
    assert prompts.length() == 4  # acked entries stay until trimmed


def test_read_blocks_for_at_most_block_ms_and_sees_new_entries(prompts: StreamQueue[PromptTask]) -> None:
    t0 = time.monotonic()
    assert prompts.read("gen-a", count=1, block_ms=150) == []
    assert 0.1 <= time.monotonic() - t0 < 2.0
    prompts.add(task(9))
    assert ids_of(prompts.read("gen-a", count=1, block_ms=150)) == ["task-9"]


def test_entries_added_before_the_group_exists_are_delivered(redis_client: redis.Redis) -> None:
    # the learner's feeder may fill the stream before the first generator creates the group
    feeder_side = prompt_queue(redis_client, KEYS)
    redis_client.xadd(KEYS.prompts, {"m": task(0).to_bytes()})
    feeder_side.add(task(1))
    generator_side = prompt_queue(redis_client, KEYS)
    assert generator_side.ensure_group() is True
    assert ids_of(generator_side.read("gen-a", count=10)) == ["task-0", "task-1"]


def test_ensure_group_is_idempotent_and_does_not_rewind(prompts: StreamQueue[PromptTask]) -> None:
    prompts.add(task(0))
    assert ids_of(prompts.read("gen-a", count=10)) == ["task-0"]
    assert prompts.ensure_group() is False
    assert prompts.ensure_group() is False
    assert prompts.read("gen-a", count=10) == []  # not delivered again
    assert prompts.pending_count() == 1
    groups = prompts.client.xinfo_groups(KEYS.prompts)
    assert [g["name"] for g in groups] == [GENERATOR_GROUP.encode()]


def test_dead_consumer_entries_are_reclaimed_by_another(prompts: StreamQueue[PromptTask]) -> None:
    for i in range(5):
        prompts.add(task(i))
    taken_by_a = prompts.read("gen-a", count=4)  # gen-a then dies without acking
    assert ids_of(taken_by_a) == ["task-0", "task-1", "task-2", "task-3"]

    assert prompts.reclaim("gen-b", min_idle_ms=5_000, count=10) == []  # not idle long enough yet
    time.sleep(0.08)
    reclaimed = prompts.reclaim("gen-b", min_idle_ms=50, count=10)
    assert ids_of(reclaimed) == ids_of(taken_by_a)
    assert [e for e, _ in reclaimed] == [e for e, _ in taken_by_a]
    pending = prompts.client.xpending(KEYS.prompts, GENERATOR_GROUP)
    assert pending["consumers"] == [{"name": b"gen-b", "pending": 4}]

    assert ids_of(prompts.read("gen-b", count=10)) == ["task-4"]  # reclaiming did not consume new entries
    prompts.ack([e for e, _ in reclaimed])
    assert prompts.pending_count() == 1
    [(last_id, last)] = prompts.reclaim("gen-c", min_idle_ms=0, count=10)  # acked entries are not reclaimed
    assert last.task_id == "task-4"
    prompts.ack([last_id])
    assert prompts.pending_count() == 0


def test_reclaim_respects_count_and_skips_bad_entries(prompts: StreamQueue[PromptTask]) -> None:
    r = prompts.client
    for payload in [
        task(0).to_bytes(),
        b"junk",
        task(1).to_bytes(),
        b"junk",
        task(2).to_bytes(),
        task(3).to_bytes(),
    ]:
        r.xadd(KEYS.prompts, {"m": payload})
    # an older consumer read them raw (no decoding, so nothing was dead-lettered) and died
    r.xreadgroup(GENERATOR_GROUP, "old", {KEYS.prompts: ">"}, count=10)
    assert prompts.pending_count() == 6
    time.sleep(1.0)

    # the first XAUTOCLAIM of 3 returns only 2 good messages; the cursor loop fetches the third
    first = prompts.reclaim("gen-b", min_idle_ms=900, count=3)
    assert ids_of(first) == ["task-0", "task-1", "task-2"]
    assert len(dead_letters(r, KEYS.dead)) == 2
    assert prompts.pending_count() == 4
    # what gen-b just took is no longer idle; only the last entry is left to take
    assert ids_of(prompts.reclaim("gen-c", min_idle_ms=900, count=3)) == ["task-3"]


def test_bad_entries_go_to_dead_letters_and_good_ones_flow_in_order(prompts: StreamQueue[PromptTask]) -> None:
    r = prompts.client
    wrong_version = msgpack.packb({"v": 99, "t": "PromptTask", "d": {}})
    good_ids = [prompts.add(task(0))]
    bad = {
        r.xadd(KEYS.prompts, {"m": b"\xc1\x00garbage"}): ("undecodable msgpack", b"\xc1\x00garbage"),
        r.xadd(KEYS.prompts, {"payload": b"no m field"}): ("missing field 'm'", None),
    }
    good_ids.append(prompts.add(task(1)))
    bad[r.xadd(KEYS.prompts, {"m": wrong_version})] = ("unknown schema version 99", wrong_version)
    bad[r.xadd(KEYS.prompts, {"m": group(0).to_bytes()})] = ("expected message type", group(0).to_bytes())
    good_ids.append(prompts.add(task(2)))

    got = prompts.read("gen-a", count=100)
    assert [e for e, _ in got] == good_ids
    assert ids_of(got) == ["task-0", "task-1", "task-2"]
    assert prompts.dead_lettered == 4
    assert prompts.pending_count() == 3  # only the good ones wait for an ack

    letters = dead_letters(r, KEYS.dead, count=10)
    assert [d.entry_id for d in letters] == [e.decode() for e in bad]
    for letter, (reason, raw) in zip(letters, bad.values(), strict=True):
        assert isinstance(letter, DeadLetter)
        assert reason in letter.reason
        assert letter.stream == KEYS.prompts
        if raw is not None:
            assert letter.raw == raw
    assert msgpack.unpackb(letters[1].raw) == {"payload": b"no m field"}  # what the entry did hold

    prompts.ack([e for e, _ in got])
    assert prompts.pending_count() == 0
    time.sleep(0.02)
    assert prompts.reclaim("gen-b", min_idle_ms=0, count=10) == []  # bad entries are never retried
    assert prompts.read("gen-b", count=10) == []
    assert len(dead_letters(r, KEYS.dead)) == 4


def test_entry_deleted_while_pending_is_dead_lettered_on_reclaim(prompts: StreamQueue[PromptTask]) -> None:
    entry_id = prompts.add(task(0))
    prompts.read("gen-a", count=1)
    prompts.client.xdel(KEYS.prompts, entry_id)
    assert prompts.reclaim("gen-b", min_idle_ms=0, count=10) == []
    assert prompts.pending_count() == 0
    [letter] = dead_letters(prompts.client, KEYS.dead)
    assert letter.entry_id == entry_id and "deleted" in letter.reason


def test_poison_message_is_dead_lettered_after_max_deliveries(redis_client: redis.Redis) -> None:
    q = StreamQueue(redis_client, KEYS.prompts, GENERATOR_GROUP, PromptTask, KEYS.dead, max_deliveries=2)
    q.ensure_group()
    q.add(task(0))
    assert ids_of(q.read("gen-a", count=1)) == ["task-0"]  # delivery 1; gen-a crashes on it
    assert ids_of(q.reclaim("gen-b", min_idle_ms=0, count=1)) == ["task-0"]  # delivery 2; gen-b crashes too
    assert q.reclaim("gen-c", min_idle_ms=0, count=1) == []  # delivery 3 would exceed the limit
    assert q.pending_count() == 0
    [letter] = dead_letters(redis_client, KEYS.dead)
    assert "delivered 3 times" in letter.reason and letter.raw == task(0).to_bytes()


def test_queue_recovers_when_the_group_disappears(prompts: StreamQueue[PromptTask]) -> None:
    prompts.add(task(0))
    prompts.client.delete(KEYS.prompts)  # as after a restart of a Redis without persistence
    assert prompts.read("gen-a", count=1) == []
    prompts.add(task(1))
    assert ids_of(prompts.read("gen-a", count=1)) == ["task-1"]


def test_blocked_read_survives_its_stream_being_deleted(prompts: StreamQueue[PromptTask], redis_url: str) -> None:
    """A restarted learner resets the streams while generators are blocked in XREADGROUP; Redis 7 wakes them
    with "UNBLOCKED the stream key no longer exists", which must not crash them."""
    other = connect(redis_url, socket_timeout_s=5.0)

    def delete_once_blocked() -> None:  # not after a fixed delay: the read must be blocked when the key goes
        deadline = time.monotonic() + 10
        while other.info("clients")["blocked_clients"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        other.delete(KEYS.prompts)

    timer = threading.Thread(target=delete_once_blocked)
    timer.start()
    t0 = time.monotonic()
    assert prompts.read("gen-a", count=1, block_ms=2000) == []  # woken by the delete, group recreated
    timer.join()
    assert time.monotonic() - t0 < 1.9  # it was really blocked and woken, not timed out
    prompts.add(task(2))
    assert ids_of(prompts.read("gen-a", count=1)) == ["task-2"]


def test_trim_acked_keeps_pending_and_undelivered_entries(prompts: StreamQueue[PromptTask]) -> None:
    ids = [prompts.add(task(i)) for i in range(6)]
    got = prompts.read("gen-a", count=4)
    prompts.ack([ids[0], ids[1], ids[3]])  # ids[2] still pending; ids[4:] not delivered yet
    assert prompts.trim_acked() == 2
    assert [e.decode() for e, _ in prompts.client.xrange(KEYS.prompts)] == ids[2:]
    assert prompts.backlog() == 2
    time.sleep(0.02)
    assert ids_of(prompts.reclaim("gen-b", min_idle_ms=0, count=10)) == ["task-2"]
    assert ids_of(prompts.read("gen-b", count=10)) == ["task-4", "task-5"]
    prompts.ack([e for e, _ in got] + ids[4:])
    assert prompts.trim_acked() == 4 and prompts.length() == 0


def test_trajectories_cross_redis_bit_exact(redis_client: redis.Redis) -> None:
    q = trajectory_queue(redis_client, KEYS)
    q.ensure_group()
    q.add(group(5))
    [(_, back)] = q.read("learner", count=1)
    want = group(5)
    assert back.task_id == want.task_id and back.policy_version == 2
    np.testing.assert_array_equal(back.samples[1].response_ids, want.samples[1].response_ids)
    np.testing.assert_array_equal(back.samples[1].logprobs, want.samples[1].logprobs)


def test_queue_refuses_misuse(redis_client: redis.Redis, redis_url: str) -> None:
    q = prompt_queue(redis_client, KEYS)
    with pytest.raises(TypeError):
        q.add(group(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="forever"):
        q.read("gen-a", count=1, block_ms=0)
    with pytest.raises(ValueError, match="socket timeout"):
        q.read("gen-a", count=1, block_ms=5_000)  # the fixture's client times out after 5 s
    with pytest.raises(ValueError, match="decode_responses"):
        prompt_queue(redis.Redis.from_url(redis_url, decode_responses=True), KEYS)
    assert q.length() == 0 and q.pending_count() == 0 and q.backlog() == 0  # no stream, no group yet


def test_maxlen_caps_the_stream(redis_client: redis.Redis) -> None:
    q = StreamQueue(redis_client, KEYS.prompts, GENERATOR_GROUP, PromptTask, KEYS.dead, maxlen=10)
    q.add_many(task(i) for i in range(1000))
    assert q.length() < 1000  # approximate trimming: roughly maxlen, never the whole history


# --- the embedded server -----------------------------------------------------------------------------------


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def process_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (an orphan's reaper may be slow, or absent in a container)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_embedded_redis_is_private_and_stop_kills_it() -> None:
    server = EmbeddedRedis().start()
    port, pid, workdir = server.port, server.pid, server.workdir
    assert port is not None and pid is not None and workdir is not None
    assert server.url == f"redis://127.0.0.1:{port}/0"
    client = connect(server.url, socket_timeout_s=2.0)
    assert client.ping()
    config = client.config_get("*")
    assert config["bind"] == "127.0.0.1" and config["save"] == "" and config["appendonly"] == "no"
    assert config["protected-mode"] == "yes" and config["dir"] == os.path.realpath(workdir)
    client.close()

    server.stop()
    assert not server.running and not port_open(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie
    assert not os.path.exists(workdir)
    server.stop()  # idempotent


def test_embedded_redis_context_manager_and_distinct_ports() -> None:
    with EmbeddedRedis() as a, EmbeddedRedis() as b:
        assert a.port != b.port
        connect(a.url).set("k", "a")
        assert connect(b.url).get("k") is None
        port = a.port
    assert not port_open(port)


def test_missing_binary_says_how_to_install() -> None:
    with pytest.raises(RedisServerError, match="apt-get install redis-server"):
        EmbeddedRedis(binary="/nonexistent/redis-server").start()
    with pytest.raises(RedisServerError, match="apt-get install redis-server"):
        EmbeddedRedis(binary="redis-server-not-installed").start()


def test_connect_times_out_instead_of_hanging() -> None:
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = connect(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", socket_timeout_s=0.2)
        t0 = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert time.monotonic() - t0 < 3.0


def test_stop_kills_a_server_that_ignores_sigterm() -> None:
    server = EmbeddedRedis(stop_timeout_s=0.2).start()
    port, pid = server.port, server.pid
    assert port is not None and pid is not None
    os.kill(pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM; only SIGKILL ends it
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 3.0
    assert server.proc is not None and server.proc.returncode == -signal.SIGKILL
    assert not port_open(port)


def test_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from services.redis_server import EmbeddedRedis\n"
        "server = EmbeddedRedis().start()\n"
        "print(server.pid, server.port, flush=True)\n"
        "time.sleep(60)\n"
    )
    root = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=root,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        assert parent.stdout is not None
        pid, port = (int(x) for x in parent.stdout.readline().split())
        assert port_open(port)
        parent.kill()  # SIGKILL: no atexit, no finalizers run
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while port_open(port) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not port_open(port)
        assert not process_alive(pid)
    finally:
        parent.kill()
        parent.wait(timeout=10)

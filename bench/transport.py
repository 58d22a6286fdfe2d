"""Trajectory transport: TrajectoryGroups through the real queue, against raw Redis stream calls on the same bytes.

Payload: `--groups` groups of `--samples` samples × `--tokens` response tokens (ORZ-sized: 64 × 2k), each
sample carrying its int32 token ids and float32 behaviour log-probs, as a generator publishes them; the
groups whose prompts asked for texts (`--text-fraction`, default 4 in 128: the learner's 4 logged samples
per batch of ORZ's 128 prompts) also carry the decoded texts, `--chars-per-token` characters per token.
One real `redis-server` on loopback.

- `codec`: `TrajectoryGroup.to_fields` + `from_fields` (the validation included) alone, as MB/s. A group
  travels as a stream entry of five fields: `m`, a few-KB msgpack frame, and its four arrays as they lie
  (prompt ids, lengths, every response's ids, every log-prob), read back as views (services/protocol.py).
- `queue`: the production path, a batch of `--batch` groups at a time: `StreamQueue.add_many` (encode, one
  XADD pipeline) → `StreamQueue.read` (XREADGROUP + decode + validation) → XACK.
- `raw`: the same fields, already encoded, through XADD (pipeline) → XREADGROUP → XACK with redis-py
  and no decoding: what Redis and the client library cost by themselves (a `redis-benchmark`-style
  baseline on the same payloads, same server, same client settings, same run).
Ratios: queue / raw (goal ≥ 0.8) and codec MB/s over the raw path's MB/s (goal ≥ 5). Prints JSON.

    python bench/transport.py --groups 64 --samples 64 --tokens 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from services.memory import keep_freed_memory
from services.protocol import TrajectoryGroup
from services.queue import StreamQueue
from services.redis_client import connect
from services.redis_server import EmbeddedRedis


def make_group(rng: np.random.Generator, index: int, samples: int, tokens: int, chars_per_token: int,
               vocab: int = 151_936, texts: bool = True) -> TrajectoryGroup:
    """One prompt's group with ORZ-like lengths: each response between half and all of `tokens`, built as the
    publisher builds it (`TrajectoryGroup.build`: lists from the engine, laid out once)."""
    ids, lps, texts_ = [], [], []
    for _ in range(samples):
        t = int(rng.integers(tokens // 2, tokens + 1))
        ids.append(rng.integers(0, vocab, t, dtype=np.int32).tolist())
        lps.append((-rng.exponential(0.5, t)).astype(np.float32).tolist())
        texts_.append("".join(rng.choice(list("abcdefghij +-=()0123456789\\"), t * chars_per_token)) if texts else "")
    return TrajectoryGroup.build(f"task-{index}", rng.integers(0, vocab, 200, dtype=np.int32), ids, lps,
                                 [float(rng.random() < 0.5) for _ in range(samples)], ["stop"] * samples, texts_,
                                 ["correct"] * samples, 3, "gen-bench", 3, {"generate_s": 1.0, "grade_s": 0.1})


def received(fields: dict) -> dict[bytes, bytes]:
    """A group's stream fields as a reader receives them (bytes keys and values)."""
    return {k.encode(): bytes(v) for k, v in fields.items()}


def bench_codec(groups: list[TrajectoryGroup], repeats: int) -> dict:
    """`to_fields` (what a generator XADDs) and `from_fields` (what the learner decodes) on the fields as read."""
    entries = [received(g.to_fields()) for g in groups]
    total = sum(len(v) for e in entries for v in e.values())
    enc, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for g in groups:
            g.to_fields()
        enc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for e in entries:
            TrajectoryGroup.from_fields(e)
        dec.append(time.perf_counter() - t0)
    e, d = statistics.median(enc), statistics.median(dec)
    return {"bytes_per_group": total / len(groups), "encode_mb_s": total / e / 1e6, "decode_mb_s": total / d / 1e6,
            "encode_decode_mb_s": total / (e + d) / 1e6}


def bench_queue(client, groups: list[TrajectoryGroup], batch: int, stream: str) -> float:
    """Seconds to move every group through the production path, `batch` groups at a time: `StreamQueue.add_many`
    (to_fields, one XADD pipeline), `read` (XREADGROUP, from_fields and its checks), `ack`."""
    q = StreamQueue(client, stream, "learner", TrajectoryGroup, f"{stream}:dead")
    q.ensure_group()
    t0 = time.perf_counter()
    for i in range(0, len(groups), batch):
        chunk = groups[i:i + batch]
        q.add_many(chunk)
        got = []
        while len(got) < len(chunk):
            got += q.read("learner-0", len(chunk) - len(got))
        q.ack([eid for eid, _ in got])
    elapsed = time.perf_counter() - t0
    assert client.xpending(stream, "learner")["pending"] == 0 and q.dead_lettered == 0
    client.delete(stream)
    return elapsed


def bench_raw(client, entries: list[dict], batch: int, stream: str) -> float:
    """The same fields, already encoded, through redis-py's XADD pipeline, XREADGROUP and XACK."""
    client.xgroup_create(stream, "learner", id="0", mkstream=True)
    t0 = time.perf_counter()
    for i in range(0, len(entries), batch):
        chunk = entries[i:i + batch]
        pipe = client.pipeline(transaction=False)
        for fields in chunk:
            pipe.xadd(stream, fields)
        pipe.execute()
        got = []
        while len(got) < len(chunk):
            reply = client.xreadgroup("learner", "learner-0", {stream: ">"}, count=len(chunk) - len(got))
            got += [eid for eid, fields in reply[0][1] if fields[b"m"]]
        client.xack(stream, "learner", *got)
    elapsed = time.perf_counter() - t0
    client.delete(stream)
    return elapsed


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chars-per-token", type=int, default=4)
    ap.add_argument("--text-fraction", type=float, default=4 / 128, help="groups that carry their texts")
    ap.add_argument("--batch", type=int, default=8, help="groups per XADD pipeline / XREADGROUP")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    keep_freed_memory()  # as the learner and generators do; both paths run under it

    rng = np.random.default_rng(0)
    texted = max(1, round(args.text_fraction * args.groups)) if args.text_fraction > 0 else 0
    groups = [make_group(rng, i, args.samples, args.tokens, args.chars_per_token, texts=i < texted)
              for i in range(args.groups)]
    entries = [received(g.to_fields()) for g in groups]
    total = sum(len(v) for e in entries for v in e.values())
    codec = bench_codec(groups, args.repeats)
    with EmbeddedRedis() as server:
        client = connect(server.url, socket_timeout_s=60)
        client.config_set("save", "")
        queue_s, raw_s = [], []
        for r in range(args.repeats):  # interleaved, so drift on a shared machine hits both sides alike
            raw_s.append(bench_raw(client, entries, args.batch, f"bench:raw:{r}"))
            queue_s.append(bench_queue(client, groups, args.batch, f"bench:queue:{r}"))
        client.close()
    q, raw = statistics.median(queue_s), statistics.median(raw_s)
    result = {
        "bench": "transport",
        "payload": {"groups": args.groups, "samples": args.samples, "tokens_max": args.tokens, "texted_groups": texted,
                    "mb_per_group": total / args.groups / 1e6, "mb_total": total / 1e6, "batch": args.batch},
        "codec": codec,
        "queue": {"groups_per_s": args.groups / q, "mb_s": total / q / 1e6, "seconds": queue_s},
        "raw": {"groups_per_s": args.groups / raw, "mb_s": total / raw / 1e6, "seconds": raw_s},
        "ratio_queue_over_raw": raw / q,
        "codec_over_raw": codec["encode_decode_mb_s"] / (total / raw / 1e6),
        "goals": {"queue_over_raw": 0.8, "codec_over_raw": 5.0},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

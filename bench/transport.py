"""Trajectory transport: TrajectoryGroups through the real queue, against raw Redis stream calls on the same bytes.

Payload: `--groups` groups of `--samples` samples × `--tokens` response tokens (ORZ-sized: 64 × 2k), each
sample carrying its int32 token ids, float32 behaviour log-probs and a decoded text of `--chars-per-token`
characters per token, as a generator publishes them. One real `redis-server` on loopback.

- `codec`: `TrajectoryGroup.to_bytes` + `from_bytes` (the validation included) alone, as MB/s.
- `queue`: the production path, a batch of `--batch` groups at a time: encode → XADD (one pipeline, as the
  generator publishes) → `StreamQueue.read` (XREADGROUP + decode + validation) → XACK.
- `raw`: the same byte strings, already encoded, through XADD (pipeline) → XREADGROUP → XACK with redis-py
  and no decoding: what Redis and the client library cost by themselves (a `redis-benchmark`-style
  baseline on the same payloads, same server, same run).
Ratios: queue / raw (goal ≥ 0.7) and codec MB/s (goal ≥ 1000). Prints JSON.

    python bench/transport.py --groups 64 --samples 64 --tokens 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from services.protocol import Sample, TrajectoryGroup
from services.queue import StreamQueue
from services.redis_client import connect
from services.redis_server import EmbeddedRedis


def make_group(rng: np.random.Generator, index: int, samples: int, tokens: int, chars_per_token: int,
               vocab: int = 151_936) -> TrajectoryGroup:
    """One prompt's group with ORZ-like lengths: each response between half and all of `tokens`."""
    out = []
    for _ in range(samples):
        t = int(rng.integers(tokens // 2, tokens + 1))
        ids = rng.integers(0, vocab, t, dtype=np.int32)
        logprobs = -rng.exponential(0.5, t).astype(np.float32)
        text = "".join(rng.choice(list("abcdefghij +-=()0123456789\\"), t * chars_per_token))
        out.append(Sample(ids, logprobs, float(rng.random() < 0.5), "stop", text, "correct"))
    return TrajectoryGroup(f"task-{index}", rng.integers(0, vocab, 200, dtype=np.int32), tuple(out), 3,
                           "gen-bench", 3, {"generate_s": 1.0, "grade_s": 0.1})


def bench_codec(groups: list[TrajectoryGroup], repeats: int) -> dict:
    blobs = [g.to_bytes() for g in groups]
    total = sum(map(len, blobs))
    enc, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for g in groups:
            g.to_bytes()
        enc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for b in blobs:
            TrajectoryGroup.from_bytes(b)
        dec.append(time.perf_counter() - t0)
    e, d = statistics.median(enc), statistics.median(dec)
    return {"bytes_per_group": total / len(groups), "encode_mb_s": total / e / 1e6, "decode_mb_s": total / d / 1e6,
            "encode_decode_mb_s": total / (e + d) / 1e6}


def bench_queue(client, groups: list[TrajectoryGroup], batch: int, stream: str) -> float:
    """Seconds to move every group through the production path, `batch` groups at a time."""
    q = StreamQueue(client, stream, "learner", TrajectoryGroup, f"{stream}:dead")
    q.ensure_group()
    t0 = time.perf_counter()
    for i in range(0, len(groups), batch):
        chunk = groups[i:i + batch]
        pipe = client.pipeline(transaction=False)
        for g in chunk:
            pipe.xadd(stream, {"m": g.to_bytes()})
        pipe.execute()
        got = []
        while len(got) < len(chunk):
            got += q.read("learner-0", len(chunk) - len(got))
        q.ack([eid for eid, _ in got])
    elapsed = time.perf_counter() - t0
    assert client.xpending(stream, "learner")["pending"] == 0
    client.delete(stream)
    return elapsed


def bench_raw(client, blobs: list[bytes], batch: int, stream: str) -> float:
    client.xgroup_create(stream, "learner", id="0", mkstream=True)
    t0 = time.perf_counter()
    for i in range(0, len(blobs), batch):
        chunk = blobs[i:i + batch]
        pipe = client.pipeline(transaction=False)
        for b in chunk:
            pipe.xadd(stream, {"m": b})
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
    ap.add_argument("--batch", type=int, default=8, help="groups per XADD pipeline / XREADGROUP")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    groups = [make_group(rng, i, args.samples, args.tokens, args.chars_per_token) for i in range(args.groups)]
    blobs = [g.to_bytes() for g in groups]
    total = sum(map(len, blobs))
    codec = bench_codec(groups, args.repeats)
    with EmbeddedRedis() as server:
        client = connect(server.url, socket_timeout_s=60)
        client.config_set("save", "")
        queue_s, raw_s = [], []
        for r in range(args.repeats):  # interleaved, so drift on a shared machine hits both sides alike
            raw_s.append(bench_raw(client, blobs, args.batch, f"bench:raw:{r}"))
            queue_s.append(bench_queue(client, groups, args.batch, f"bench:queue:{r}"))
        client.close()
    q, raw = statistics.median(queue_s), statistics.median(raw_s)
    result = {
        "bench": "transport",
        "payload": {"groups": args.groups, "samples": args.samples, "tokens_max": args.tokens,
                    "mb_per_group": total / args.groups / 1e6, "mb_total": total / 1e6, "batch": args.batch},
        "codec": codec,
        "queue": {"groups_per_s": args.groups / q, "mb_s": total / q / 1e6, "seconds": queue_s},
        "raw": {"groups_per_s": args.groups / raw, "mb_s": total / raw / 1e6, "seconds": raw_s},
        "ratio_queue_over_raw": raw / q,
        "goals": {"queue_over_raw": 0.7, "codec_mb_s": 1000},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

"""Weight sync: broadcast a Qwen2.5-0.5B-shaped model to generator processes over gloo, against raw TCP.

Both measured in one run, to the same receiver processes, over loopback:
- `broadcast`: services/weight_sync.py as the learner uses it — WeightSender (rank 0, this process) to
  `--receivers` WeightReceiver processes, flat buckets of `--bucket-mb`, fp32; timed from the header to the
  last bucket received by every receiver. The first sync also allocates the buffers (`first_broadcast_s`);
  the median of the later ones is the steady state.
- `load`: each receiver then copies every tensor into its resident model (a `Qwen2ForCausalLM` of the same
  config, random init) parameter by parameter — the in-place copy an engine's weight reload does; the
  slowest receiver's time is reported. (vLLM's own reload is measured per run: `orz_generator_weight_load_
  seconds`.)
- `raw_tcp`: the same number of bytes sent with `socket.sendall` from this process to each receiver at
  once (one thread per receiver) into a preallocated buffer: what the loopback itself can carry.
The model's parameter names and shapes are Qwen2.5-0.5B's (hidden 896, 24 layers, 14 heads, 2 KV heads,
vocab 151,936, tied embeddings), built from a `Qwen2Config` on the meta device; the weights are random.
Prints JSON; the goal is broadcast ≥ 0.7 × raw TCP (`ratio`; `ratio_with_load` counts the load too).
`--sweep 64,128,512` also times the broadcast at those bucket sizes (`by_bucket_mb`), and `--threads` sets
the gloo transport threads (`weight_sync.gloo_threads`; `--threads 1` is the single-device baseline).

    python bench/weight_sync.py --receivers 2 --bucket-mb 512 --repeats 3 --sweep 64,128,256
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import threading
import time
import uuid

import torch

from services.metrics import free_port
from services.protocol import WeightsAnnouncement
from services.weight_sync import STOP_VERSION, WeightReceiver, WeightSender


def qwen25_05b_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                      tie_word_embeddings=True)


def qwen25_05b_shapes() -> list[tuple[str, tuple[int, ...]]]:
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(qwen25_05b_config())
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]  # tied head listed once


def receiver(anns: list[bytes], rank: int, repeats: int, tcp_port: int, total_bytes: int, ready, done) -> None:
    torch.set_num_threads(1)
    server = socket.create_server(("127.0.0.1", tcp_port))
    ready.put(rank)
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM(qwen25_05b_config())  # the receiver's resident copy the new weights land in
    params = dict(model.named_parameters())
    for sweep_ann in anns[1:]:  # other bucket sizes: broadcast only
        recv = WeightReceiver(WeightsAnnouncement.from_bytes(sweep_ann), rank, timeout_s=600)
        for _ in range(repeats):
            version, _ = recv.receive()
            done.put(("sweep", rank, version, 0.0, 0.0))
        if recv.receive()[0] != STOP_VERSION:
            raise RuntimeError("expected the stop header")
    recv = WeightReceiver(WeightsAnnouncement.from_bytes(anns[0]), rank, timeout_s=600)
    for _ in range(repeats):
        version, weights = recv.receive()
        t0 = time.perf_counter()
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)
        load_s = time.perf_counter() - t0
        done.put(("broadcast", rank, version, float(params[weights[-1][0]].detach().sum()), load_s))
    version, _ = recv.receive()
    if version != STOP_VERSION:
        raise RuntimeError(f"expected the stop header, got version {version}")
    conn, _ = server.accept()
    buf = bytearray(min(total_bytes, 256 * 2**20))
    view = memoryview(buf)
    for _ in range(repeats):
        got = 0
        while got < total_bytes:
            n = conn.recv_into(view[: min(len(buf), total_bytes - got)])
            if n == 0:
                raise RuntimeError("sender closed early")
            got += n
        conn.sendall(b"k")
    conn.close()
    done.put(("tcp", rank, repeats, 0.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="gloo transport threads (weight_sync.gloo_threads)")
    ap.add_argument("--sweep", default="", help="comma-separated bucket sizes (MB) to time too")
    args = ap.parse_args()
    torch.set_num_threads(1)

    shapes = qwen25_05b_shapes()
    params = sum(torch.Size(s).numel() for _, s in shapes)
    total_bytes = params * 4
    gen = torch.Generator().manual_seed(0)
    state = {name: torch.empty(shape).normal_(0, 0.02, generator=gen) for name, shape in shapes}

    def announcement(bucket_mb: int) -> WeightsAnnouncement:
        return WeightsAnnouncement(
            rendezvous=f"tcp://127.0.0.1:{free_port()}", world_size=1 + args.receivers, backend="gloo",
            names=tuple(n for n, _ in shapes), shapes=tuple(s for _, s in shapes), dtype="float32",
            bucket_bytes=bucket_mb * 2**20, session=uuid.uuid4().hex, transport_threads=args.threads,
        )

    sweep_mb = [int(x) for x in args.sweep.split(",") if x and int(x) != args.bucket_mb]
    ann = announcement(args.bucket_mb)
    anns = [ann] + [announcement(mb) for mb in sweep_mb]
    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Queue()
    tcp_ports = [free_port() for _ in range(args.receivers)]
    procs = [ctx.Process(target=receiver, args=([a.to_bytes() for a in anns], r + 1, args.repeats, tcp_ports[r],
                                                 total_bytes, ready, done)) for r in range(args.receivers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)

    by_bucket = {}
    for mb, sweep_ann in zip(sweep_mb, anns[1:]):
        sweep_sender = WeightSender(sweep_ann, timeout_s=600)
        sweep_sender.connect()
        times = []
        for version in range(args.repeats):
            t0 = time.perf_counter()
            sweep_sender.send(version, state)
            [done.get(timeout=600) for _ in procs]
            times.append(time.perf_counter() - t0)
        sweep_sender.stop()
        by_bucket[mb] = {"broadcast_s": round(statistics.median(times[1:] or times), 3),
                         "buckets": len(sweep_sender.buckets)}

    sender = WeightSender(ann, timeout_s=600)
    sender.connect()
    bcast_times, load_times = [], []
    expected = float(state[shapes[-1][0]].sum())
    for version in range(args.repeats):
        t0 = time.perf_counter()
        sender.send(version, state)
        acks = [done.get(timeout=600) for _ in procs]  # received and loaded on every receiver
        bcast_times.append(time.perf_counter() - t0 - max(a[4] for a in acks))
        load_times.append(max(a[4] for a in acks))
        assert all(a[0] == "broadcast" and a[2] == version and abs(a[3] - expected) < 1e-3 for a in acks), acks
    sender.stop()

    payload = memoryview(bytearray(min(total_bytes, 256 * 2**20)))
    conns = [socket.create_connection(("127.0.0.1", p)) for p in tcp_ports]

    def push(conn: socket.socket) -> None:
        sent = 0
        while sent < total_bytes:
            chunk = payload[: min(len(payload), total_bytes - sent)]
            conn.sendall(chunk)
            sent += len(chunk)
        if conn.recv(1) != b"k":
            raise RuntimeError("receiver did not acknowledge")

    tcp_times = []
    for _ in range(args.repeats):
        threads = [threading.Thread(target=push, args=(c,)) for c in conns]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        tcp_times.append(time.perf_counter() - t0)
    for c in conns:
        c.close()
    for p in procs:
        p.join(60)

    bcast_s, tcp_s = statistics.median(bcast_times), statistics.median(tcp_times)
    gb = total_bytes * args.receivers / 1e9  # bytes delivered, all receivers together
    print(json.dumps({
        "benchmark": "weight_sync_broadcast", "model": "Qwen2.5-0.5B shapes (random weights)", "params": params,
        "bytes_per_copy": total_bytes, "receivers": args.receivers, "bucket_mb": args.bucket_mb,
        "buckets": len(sender.buckets), "dtype": "float32",
        "first_broadcast_s": round(bcast_times[0], 3), "load_s": round(statistics.median(load_times), 3),
        "broadcast_s": round(bcast_s, 3), "broadcast_GBps": round(gb / bcast_s, 3),
        "raw_tcp_s": round(tcp_s, 3), "raw_tcp_GBps": round(gb / tcp_s, 3),
        "ratio": round(tcp_s / bcast_s, 3), "goal_ratio": 0.7, "transport_threads": args.threads,
        "by_bucket_mb": {**by_bucket, args.bucket_mb: {"broadcast_s": round(bcast_s, 3),
                                                       "buckets": len(sender.buckets)}},
        "ratio_with_load": round(tcp_s / (bcast_s + statistics.median(load_times)), 3),
        "broadcast_times": [round(t, 3) for t in bcast_times], "load_times": [round(t, 3) for t in load_times],
        "raw_tcp_times": [round(t, 3) for t in tcp_times],
    }, indent=1))


if __name__ == "__main__":
    main()

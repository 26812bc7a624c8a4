"""Steal RPC round trip and token-forwarding latency on loopback, beside a bare ZeroMQ round trip.

    python -m bench.rpc_latency [--n 2000] [--out out/rpc_latency.png]

Three measurements, each over TCP loopback against a separate process, interleaved so they
share the machine's noise:
- bare:   DEALER -> ROUTER echo of a 200-byte frame (the floor any ZeroMQ RPC pays);
- steal:  a real node's steal socket: Steal -> decode, pick a task, lease it, encode -> Grant;
- tokens: a Tokens message with a final item for the stolen task -> the origin checks the
          lease, delivers to the client stream, answers Ack (the ack round trip bounds the
          one-way forwarding latency from above).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import zmq
from rich.progress import Progress

from p2psched import PROTOCOL_VERSION
from p2psched.protocol import Ack, Grant, Steal, TokenItem, Tokens, decode, encode

ECHO_SERVER = """
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
port = s.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
while True:
    s.send_multipart(s.recv_multipart())
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rpc_latency")
    parser.add_argument("--n", type=int, default=2000, help="round trips of each kind")
    parser.add_argument("--out", default="out/rpc_latency.png", help="latency CDF plot (PNG)")
    args = parser.parse_args(argv)
    if args.n < 10:
        print("error: --n must be at least 10", file=sys.stderr)
        return 2

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    victim = subprocess.Popen([sys.executable, "-m", "bench.victim", str(args.n + 10)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert echo.stdout is not None and victim.stdout is not None
        echo_port = int(echo.stdout.readline())
        info = json.loads(victim.stdout.readline())
        ctx = zmq.Context()
        thief_id = uuid.uuid4().hex
        bare = ctx.socket(zmq.DEALER)
        bare.connect(f"tcp://127.0.0.1:{echo_port}")
        steal_sock = ctx.socket(zmq.DEALER)
        result_sock = ctx.socket(zmq.DEALER)
        for sock in (steal_sock, result_sock):
            sock.setsockopt(zmq.ROUTING_ID, thief_id.encode())
        steal_sock.connect(info["steal"])
        result_sock.connect(info["result"])
        for sock in (bare, steal_sock, result_sock):
            sock.setsockopt(zmq.RCVTIMEO, 5000)
            sock.setsockopt(zmq.LINGER, 0)

        payload = os.urandom(200)
        for _ in range(50):  # warm up connections and caches
            bare.send(payload)
            bare.recv()
        samples: dict[str, list[float]] = {"bare": [], "steal": [], "tokens": []}
        with Progress(transient=True) as progress:
            task = progress.add_task("round trips", total=args.n)
            for i in range(args.n):
                t0 = time.perf_counter()
                bare.send(payload)
                bare.recv()
                t1 = time.perf_counter()
                steal_sock.send(encode(Steal(PROTOCOL_VERSION, uuid.uuid4().hex, thief_id, "bench", info["model_id"],
                                             1, 1_000_000)))
                grant = decode(steal_sock.recv())
                t2 = time.perf_counter()
                assert isinstance(grant, Grant) and len(grant.tasks) == 1, grant
                granted = grant.tasks[0]
                item = TokenItem(granted.request_id, granted.epoch, 0, [7] * 16, "length", 16)
                t3 = time.perf_counter()
                result_sock.send(encode(Tokens(PROTOCOL_VERSION, thief_id, "bench", [item])))
                ack = decode(result_sock.recv())
                t4 = time.perf_counter()
                assert isinstance(ack, Ack) and ack.request_ids == [granted.request_id], ack
                samples["bare"].append((t1 - t0) * 1e6)
                samples["steal"].append((t2 - t1) * 1e6)
                samples["tokens"].append((t4 - t3) * 1e6)
                progress.advance(task)
        ctx.destroy(0)
    finally:
        for proc in (echo, victim):  # the victim would drain its whole queue on SIGTERM: kill it
            proc.kill()
            proc.wait(10)

    bare_p50 = statistics.median(samples["bare"])
    print(f"{'round trip (us)':<34}{'p50':>8}{'p90':>8}{'p99':>8}{'x bare p50':>12}")
    names = {"bare": "bare ZeroMQ echo (baseline)", "steal": "steal RPC (1-task grant)",
             "tokens": "tokens -> ack (final item)"}
    for key, label in names.items():
        values = samples[key]
        print(f"{label:<34}{pct(values, 50):>8.0f}{pct(values, 90):>8.0f}{pct(values, 99):>8.0f}"
              f"{statistics.median(values) / bare_p50:>12.2f}")
    print(f"n={args.n} per kind, loopback TCP, {os.cpu_count()} CPU(s)")
    _plot(samples, names, Path(args.out))
    return 0


def _plot(samples: dict[str, list[float]], names: dict[str, str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in names.items():
        values = sorted(samples[key])
        ax.plot(values, [i / len(values) for i in range(len(values))], label=label)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("round trip (µs, log scale)")
    ax.set_ylabel("fraction of round trips")
    ax.set_title("p2psched RPC latency on loopback")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot: {out}")


if __name__ == "__main__":
    sys.exit(main())

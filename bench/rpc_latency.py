"""Steal RPC round trip and token-forwarding latency on loopback, beside a bare ZeroMQ round trip,
in plain text and over CurveZMQ.

    python -m bench.rpc_latency [--n 2000] [--out out/rpc_latency.png]

Five measurements, each over TCP loopback against a separate process, interleaved so they
share the machine's noise:
- bare:   DEALER -> ROUTER echo of a 200-byte frame (the floor any ZeroMQ RPC pays);
- steal:  a real node's steal socket: Steal -> decode, pick a task, lease it, encode -> Grant;
- tokens: a Tokens message with a final item for the stolen task -> the origin checks the
          lease, delivers to the client stream, answers Ack (the ack round trip bounds the
          one-way forwarding latency from above);
- steal and tokens again against a second node that runs CurveZMQ (``--curve-key-file``): the
  difference is what encryption and authentication add to a round trip.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import zmq
import zmq.auth
from rich.progress import Progress

from p2psched import PROTOCOL_VERSION
from p2psched.core.protocol import Ack, Grant, Steal, TokenItem, Tokens, decode, encode

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
    keys = Path(tempfile.mkdtemp(prefix="p2psched-rpc-keys-"))
    for name in ("victim", "thief"):
        zmq.auth.create_certificates(keys, name)
    allow = keys / "allow"
    allow.mkdir()
    shutil.copy(keys / "thief.key", allow / "thief.key")
    thief_public, thief_secret = zmq.auth.load_certificate(keys / "thief.key_secret")
    assert thief_secret is not None
    thief_id = uuid.uuid4().hex
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    victims = {
        "plain": subprocess.Popen([sys.executable, "-m", "bench.victim", str(args.n + 10), thief_id],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env),
        "curve": subprocess.Popen([sys.executable, "-m", "bench.victim", str(args.n + 10), thief_id,
                                   str(keys / "victim.key_secret"), str(allow), thief_public.decode()],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env),
    }
    try:
        assert echo.stdout is not None
        echo_port = int(echo.stdout.readline())
        infos = {mode: json.loads(proc.stdout.readline()) for mode, proc in victims.items()  # type: ignore[union-attr]
                 }
        ctx = zmq.Context()
        bare = ctx.socket(zmq.DEALER)
        bare.connect(f"tcp://127.0.0.1:{echo_port}")
        socks: dict[str, tuple[zmq.Socket[bytes], zmq.Socket[bytes]]] = {}
        for mode, info in infos.items():
            steal_sock, result_sock = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
            for sock in (steal_sock, result_sock):
                sock.setsockopt(zmq.ROUTING_ID, thief_id.encode())
                if mode == "curve":
                    sock.curve_secretkey = thief_secret
                    sock.curve_publickey = thief_public
                    sock.curve_serverkey = info["public_key"].encode()
            steal_sock.connect(info["steal"])
            result_sock.connect(info["result"])
            socks[mode] = (steal_sock, result_sock)
        for sock in (bare, *(s for pair in socks.values() for s in pair)):
            sock.setsockopt(zmq.RCVTIMEO, 5000)
            sock.setsockopt(zmq.LINGER, 0)

        payload = os.urandom(200)
        for _ in range(50):  # warm up connections and caches
            bare.send(payload)
            bare.recv()
        samples: dict[str, list[float]] = {key: [] for key in NAMES}
        with Progress(transient=True) as progress:
            task = progress.add_task("round trips", total=args.n)
            for i in range(args.n):
                t0 = time.perf_counter()
                bare.send(payload)
                bare.recv()
                samples["bare"].append((time.perf_counter() - t0) * 1e6)
                for mode, (steal_sock, result_sock) in socks.items():
                    suffix = "" if mode == "plain" else "_curve"
                    steal_us, tokens_us = _steal_and_tokens(steal_sock, result_sock, thief_id,
                                                            infos[mode]["model_id"], infos[mode]["node_id"])
                    samples["steal" + suffix].append(steal_us)
                    samples["tokens" + suffix].append(tokens_us)
                progress.advance(task)
        ctx.destroy(0)
    finally:
        for proc in (echo, *victims.values()):  # a victim would drain its whole queue on SIGTERM: kill it
            proc.kill()
            proc.wait(10)
        shutil.rmtree(keys, ignore_errors=True)

    bare_p50 = statistics.median(samples["bare"])
    print(f"{'round trip (us)':<40}{'p50':>8}{'p90':>8}{'p99':>8}{'x bare p50':>12}")
    for key, label in NAMES.items():
        values = samples[key]
        print(f"{label:<40}{pct(values, 50):>8.0f}{pct(values, 90):>8.0f}{pct(values, 99):>8.0f}"
              f"{statistics.median(values) / bare_p50:>12.2f}")
    for kind in ("steal", "tokens"):
        extra = statistics.median(samples[kind + "_curve"]) - statistics.median(samples[kind])
        print(f"CurveZMQ adds {extra:.0f} us to the p50 {kind} round trip "
              f"({statistics.median(samples[kind + '_curve']) / statistics.median(samples[kind]):.2f}x)")
    print(f"n={args.n} per kind, loopback TCP, {os.cpu_count()} CPU(s)")
    _plot(samples, NAMES, Path(args.out))
    return 0


NAMES = {"bare": "bare ZeroMQ echo (baseline)", "steal": "steal RPC (1-task grant)",
         "tokens": "tokens -> ack (final item)", "steal_curve": "steal RPC over CurveZMQ",
         "tokens_curve": "tokens -> ack over CurveZMQ"}


def _steal_and_tokens(steal_sock: zmq.Socket[bytes], result_sock: zmq.Socket[bytes], thief_id: str,
                      model_id: str, victim_id: str) -> tuple[float, float]:
    """One steal round trip and one tokens -> ack round trip, in microseconds."""
    t1 = time.perf_counter()
    steal_sock.send(encode(Steal(PROTOCOL_VERSION, uuid.uuid4().hex, victim_id, thief_id, "bench", model_id, 1, 1_000_000,
                                 1 << 16)))
    grant = decode(steal_sock.recv())
    t2 = time.perf_counter()
    assert isinstance(grant, Grant) and len(grant.tasks) == 1, (model_id, grant)
    granted = grant.tasks[0]
    item = TokenItem(granted.request_id, granted.epoch, 0, [7] * 16, "length", 16)
    t3 = time.perf_counter()
    result_sock.send(encode(Tokens(PROTOCOL_VERSION, thief_id, "bench", [item])))
    ack = decode(result_sock.recv())
    t4 = time.perf_counter()
    assert isinstance(ack, Ack) and ack.request_ids == [granted.request_id], ack
    return (t2 - t1) * 1e6, (t4 - t3) * 1e6


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

"""Per-peer send queues are bounded in bytes: a peer that stops reading costs us at most the
budget, and sends past it are refused (real ZeroMQ sockets, a real TCP peer that never reads)."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from p2psched.core.stats import Stats
from p2psched.transport import Sender, make_socket


async def test_a_stalled_peer_costs_at_most_the_byte_budget():
    ctx = zmq.asyncio.Context()
    peer = ctx.socket(zmq.ROUTER)  # a live ZeroMQ peer whose application never reads:
    peer.setsockopt(zmq.RCVHWM, 1)  # its queue fills, then TCP's buffers, then ours
    peer.setsockopt(zmq.RCVBUF, 4096)
    port = peer.bind_to_random_port("tcp://127.0.0.1")
    sock = make_socket(ctx, zmq.DEALER, b"me")
    sock.setsockopt(zmq.SNDBUF, 4096)
    sock.connect(f"tcp://127.0.0.1:{port}")
    stats = Stats()
    budget = 2 * 1024 * 1024
    sender = Sender(stats, max_queued_bytes=budget)
    frame = b"x" * 64 * 1024
    while not sender.send(sock, [b"hello"]):  # until the handshake is done (IMMEDIATE refuses before)
        await asyncio.sleep(0.01)
    accepted = 0
    for _ in range(400):  # 25 MiB offered
        if sender.send(sock, [frame]):
            accepted += 1
        await asyncio.sleep(0)
    # What we accepted is what we still hold (<= budget) plus the little the kernel and the peer took.
    assert 0 < accepted * len(frame) <= budget + 2 * len(frame)
    assert stats.send_budget_refusals == 400 - accepted > 300
    assert sender.queued_bytes() <= budget
    sock.close(0)
    peer.close(0)
    ctx.term()


async def test_bytes_a_reader_takes_are_given_back():
    ctx = zmq.asyncio.Context()
    server = make_socket(ctx, zmq.ROUTER)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = make_socket(ctx, zmq.DEALER, b"c")
    client.connect(f"tcp://127.0.0.1:{port}")
    stats = Stats()
    sender = Sender(stats, max_queued_bytes=256 * 1024)
    frame = b"y" * 100 * 1024
    for _ in range(20):  # 2 MB through a 256 KiB budget: fine as long as the reader keeps up
        while not sender.send(client, [frame]):
            await asyncio.sleep(0.01)
        await server.recv_multipart()
    for _ in range(100):
        if sender.queued_bytes() == 0:
            break
        await asyncio.sleep(0.01)
    assert sender.queued_bytes() == 0
    client.close(0)
    server.close(0)
    ctx.term()

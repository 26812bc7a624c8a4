"""ZeroMQ plumbing shared by every socket: options, one-frame receive, and counted drops.

The only place that calls ``protocol.decode``: a frame that fails is counted per socket and
logged at most once per peer per minute, then dropped; the loop keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import time

import zmq
import zmq.asyncio

from .errors import ProtocolError
from .protocol import MAX_FRAME_BYTES, Message, decode
from .stats import Stats

log = logging.getLogger(__name__)

# ZeroMQ itself cuts connections that send more than this (memory guard); frames between
# MAX_FRAME_BYTES and this reach ``decode`` and are counted as oversized.
ZMQ_MAXMSGSIZE = 2 * MAX_FRAME_BYTES
LOG_EVERY_S = 60.0


def make_socket(ctx: zmq.asyncio.Context, kind: int, identity: bytes | None = None) -> zmq.asyncio.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, ZMQ_MAXMSGSIZE)
    sock.setsockopt(zmq.SNDHWM, 10000)
    sock.setsockopt(zmq.RCVHWM, 10000)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sends to unknown peers raise instead of vanishing
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if kind == zmq.DEALER:
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections: a dead peer makes sends fail
    return sock


def bind(sock: zmq.asyncio.Socket, host: str, port: int) -> int:
    """Bind to host:port (0 = any free port) and return the port bound."""
    if port == 0:
        return int(sock.bind_to_random_port(f"tcp://{host}"))
    sock.bind(f"tcp://{host}:{port}")
    return port


class DropLog:
    """Counts malformed input per socket; logs once per (socket, peer) per minute."""

    def __init__(self, stats: Stats):
        self._stats = stats
        self._last: dict[tuple[str, bytes], float] = {}

    def drop(self, socket_name: str, peer: bytes, reason: str) -> None:
        self._stats.malformed[socket_name] += 1
        key = (socket_name, peer[:64])
        now = time.monotonic()
        if now - self._last.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last[key] = now
            log.warning("dropped malformed frame on %s socket from peer %r: %s", socket_name, peer[:64], reason)
        if len(self._last) > 10000:
            self._last.clear()

    def decode(self, socket_name: str, peer: bytes, frames: list[bytes], expected: tuple[type, ...]) -> Message | None:
        """The one message in ``frames``, or None after counting the drop."""
        if len(frames) != 1:
            self.drop(socket_name, peer, f"expected one frame, got {len(frames)}")
            return None
        try:
            message = decode(frames[0])
        except ProtocolError as exc:
            self.drop(socket_name, peer, str(exc))
            return None
        if not isinstance(message, expected):
            self.drop(socket_name, peer, f"unexpected message type {type(message).__name__}")
            return None
        return message


def _consume(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()


def send_now(sock: zmq.asyncio.Socket, frames: list[bytes]) -> bool:
    """Send without waiting: False when ZeroMQ refuses at once (no live peer, queue full)."""
    future: asyncio.Future[object] = sock.send_multipart(frames, zmq.NOBLOCK)  # type: ignore[assignment]
    if future.done():
        return future.exception() is None
    future.add_done_callback(_consume)
    return True

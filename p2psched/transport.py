"""ZeroMQ plumbing shared by every socket: options, bounded sends, one-frame receive, counted drops.

The only place that calls ``protocol.decode``: a frame that fails is counted per socket and
logged at most once per peer per minute, then dropped; the loop keeps running.

Send queues are bounded in bytes per peer (``Sender``): every frame is handed to ZeroMQ
without a copy and with a tracker, so the bytes a peer has not yet taken off our hands are
known exactly; a send that would take a peer past ``MAX_QUEUED_BYTES`` is refused (the caller
counts it, and the protocol recovers: a lost token message is a gap, a lost grant a timed-out
steal whose lease lapses).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections import deque

import zmq
import zmq.asyncio

from .containment import OncePerMinute
from .core.errors import ProtocolError
from .core.protocol import MAX_FRAME_BYTES, Message, decode
from .core.stats import Stats

log = logging.getLogger(__name__)

# ZeroMQ itself cuts connections that send more than this (memory guard); frames between
# MAX_FRAME_BYTES and this reach ``decode`` and are counted as oversized.
ZMQ_MAXMSGSIZE = 2 * MAX_FRAME_BYTES
MAX_QUEUED_BYTES = 4 * MAX_FRAME_BYTES  # per peer and socket: sent by us, not yet written to the kernel
HWM = 1 << 20  # messages; the byte budget above is the binding limit


def make_socket(ctx: zmq.asyncio.Context, kind: int, identity: bytes | None = None) -> zmq.asyncio.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, ZMQ_MAXMSGSIZE)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, 10000)
    sock.copy_threshold = 0  # every frame zero-copy, so its tracker tells when ZeroMQ is done with it
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
        return int(sock.bind_to_random_port(f"tcp://{_bracketed(host)}"))
    sock.bind(f"tcp://{_bracketed(host)}:{port}")
    return port


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def is_valid_endpoint(endpoint: str) -> bool:
    """``tcp://host:port`` with an IP address or a DNS name and a port in 1..65535: what a peer
    record must hold before we connect to it (``connect`` raises on anything else)."""
    if not endpoint.startswith("tcp://") or len(endpoint) > 300:
        return False
    host, sep, port = endpoint[len("tcp://"):].rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            return ipaddress.ip_address(host).version == 6
        except ValueError:
            return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(host))


class Sender:
    """Non-blocking sends with a byte budget per (socket, peer). See the module docstring."""

    def __init__(self, stats: Stats, max_queued_bytes: int = MAX_QUEUED_BYTES):
        self._stats = stats
        self._max = max_queued_bytes
        self._queued: dict[tuple[int, bytes], deque[tuple[zmq.MessageTracker, int]]] = {}
        self._bytes: dict[tuple[int, bytes], int] = {}

    def queued_bytes(self) -> int:
        """Bytes held for all peers right now. Also forgets what ZeroMQ has written or dropped
        for peers we no longer send to (the node calls it every tick, which keeps the table small)."""
        for key in list(self._queued):
            self._settle(key)
        return sum(self._bytes.values())

    def send(self, sock: zmq.asyncio.Socket, frames: list[bytes], peer: bytes = b"") -> bool:
        """Send without waiting; False when the peer's budget is spent or ZeroMQ refuses at once
        (no live peer). ``peer`` names the destination on a ROUTER (its routing id)."""
        key = (id(sock), peer)
        self._settle(key)
        size = sum(len(frame) for frame in frames)
        if self._bytes.get(key, 0) + size > self._max:
            self._stats.send_budget_refusals += 1
            return False
        future: asyncio.Future[object] = sock.send_multipart(  # type: ignore[assignment]
            frames, zmq.NOBLOCK, copy=False, track=True)
        if future.done():
            if future.exception() is not None:
                return False
            tracker = future.result()
            if isinstance(tracker, zmq.MessageTracker) and not tracker.done:
                self._queued.setdefault(key, deque()).append((tracker, size))
                self._bytes[key] = self._bytes.get(key, 0) + size
            return True
        future.add_done_callback(_consume)
        return True

    def _settle(self, key: tuple[int, bytes]) -> None:
        queue = self._queued.get(key)
        if queue is None:
            return
        while queue and queue[0][0].done:
            self._bytes[key] -= queue.popleft()[1]
        if not queue:
            del self._queued[key]
            del self._bytes[key]


class DropLog:
    """Counts malformed or unauthorized input per socket; logs once per (socket, peer) per minute."""

    def __init__(self, stats: Stats):
        self._stats = stats
        self._log = OncePerMinute()

    def drop(self, socket_name: str, peer: bytes, reason: str) -> None:
        self._stats.malformed[socket_name] += 1
        if self._log.should_log((socket_name, peer[:64])):
            log.warning("dropped malformed frame on %s socket from peer %r: %s", socket_name, peer[:64], reason)

    def refuse(self, socket_name: str, peer: bytes, reason: str) -> None:
        """A well-formed message from a sender not entitled to send it."""
        self._stats.unauthorized[socket_name] += 1
        if self._log.should_log(("refused", socket_name, peer[:64])):
            log.warning("refused a message on %s socket from peer %r: %s", socket_name, peer[:64], reason)

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

"""Thief-side links to peers: one DEALER to each peer's steal socket and one to its result socket.

A steal is a request/reply on the steal DEALER, matched by steal id. Whether a grant is taken
is decided by the pure steal table (``steals.SentSteals``: unsolicited, repeated and wrong-victim
grants are dropped and counted; a grant that arrives after the caller gave up waiting is still
applied, its tasks being leased to us); taken grants go to ``on_grant``. Load reports (answers
to probes: how long a peer's queue is, and how old) go to ``on_load``. Acks, heartbeat acks and
cancels from origins arrive on the result DEALER and go to ``on_origin_message``. Each link has
one reader loop, started in the node's task group; an error handling one message is contained
to that message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import zmq
import zmq.asyncio

from .containment import Containment
from .core.policy import PeerLoad
from .core.protocol import (
    Ack,
    Cancel,
    Grant,
    HeartbeatAck,
    LoadReport,
    Message,
    Probe,
    Steal,
    encode,
)
from .core.steals import GrantVerdict, SentSteals
from .security import CurveKeys
from .transport import DropLog, Sender, make_socket

log = logging.getLogger(__name__)

GrantHandler = Callable[[Grant], None]
LoadHandler = Callable[[LoadReport], None]
OriginHandler = Callable[[Ack | HeartbeatAck | Cancel], None]
PROBE_IDS = 256  # a load report is taken while its probe id is among the last this many sent


class PeerLink:
    def __init__(self, ctx: zmq.asyncio.Context, node_id: str, peer: PeerLoad, curve: CurveKeys | None):
        self.peer = peer
        # Without CurveZMQ the routing id names us to the peer; with it, the peer's ROUTER picks
        # one (a client-chosen id could be taken over by another allowed key) and our key names us.
        identity = node_id.encode() if curve is None else None
        self.steal = make_socket(ctx, zmq.DEALER, identity)
        self.result = make_socket(ctx, zmq.DEALER, identity)
        try:
            for sock, endpoint in ((self.steal, peer.steal_endpoint), (self.result, peer.result_endpoint)):
                if curve is not None:
                    curve.make_client(sock, peer.public_key)
                sock.connect(endpoint)
        except (zmq.ZMQError, ValueError):
            self.steal.close(0)
            self.result.close(0)
            raise
        self.waiting: dict[str, asyncio.Future[Grant | LoadReport]] = {}
        self.probes: OrderedDict[str, None] = OrderedDict()  # recent probe ids: other load reports are dropped
        self.reader: asyncio.Task[None] | None = None

    def remember_probe(self, probe_id: str) -> None:
        self.probes[probe_id] = None
        while len(self.probes) > PROBE_IDS:
            self.probes.popitem(last=False)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        self.steal.close(0)
        self.result.close(0)


class PeerLinks:
    def __init__(self, ctx: zmq.asyncio.Context, node_id: str, drops: DropLog, sender: Sender,
                 containment: Containment, steals: SentSteals, on_grant: GrantHandler, on_load: LoadHandler,
                 on_origin_message: OriginHandler, curve: CurveKeys | None = None):
        self._ctx = ctx
        self._steals = steals
        self._node_id = node_id
        self._drops = drops
        self._sender = sender
        self._containment = containment
        self._on_grant = on_grant
        self._on_load = on_load
        self._on_origin_message = on_origin_message
        self._curve = curve
        self._links: dict[str, PeerLink] = {}
        self._group: asyncio.TaskGroup | None = None

    def start(self, group: asyncio.TaskGroup) -> None:
        self._group = group

    def link(self, peer: PeerLoad) -> PeerLink:
        """The link to ``peer``, connected now if new (raises ``zmq.ZMQError`` or ``ValueError``
        for an endpoint or key ZeroMQ refuses; records are checked before they get here)."""
        link = self._links.get(peer.node_id)
        if link is not None and (link.peer.steal_endpoint, link.peer.result_endpoint, link.peer.public_key) != (
                peer.steal_endpoint, peer.result_endpoint, peer.public_key):
            link.close()
            del self._links[peer.node_id]
            link = None
        if link is None:
            assert self._group is not None, "PeerLinks.start() not called"
            link = PeerLink(self._ctx, self._node_id, peer, self._curve)
            link.reader = self._group.create_task(self._read(link), name=f"peer-{peer.name}")
            self._links[peer.node_id] = link
        link.peer = peer
        return link

    def prune(self, keep: set[str]) -> None:
        """Close links to peers that left the registry and owe us nothing."""
        for node_id in [n for n in self._links if n not in keep]:
            link = self._links[node_id]
            if link.waiting:
                continue  # a steal is in flight: keep it for now
            del self._links[node_id]
            link.close()

    async def steal(self, peer: PeerLoad, request: Steal, timeout: float) -> Grant | None:
        """Send a steal RPC to ``peer``; the grant, or None on timeout or when the send fails.
        (A grant that comes later is still applied through ``on_grant``: see ``steals.py``.)"""
        frame = encode(request)
        link = self.link(peer)
        self._steals.sent(request.steal_id, peer.node_id, time.monotonic())
        try:
            reply = await self._call(link, request.steal_id, frame, timeout)
        finally:
            self._steals.gave_up(request.steal_id)  # a no-op once answered
        return reply if isinstance(reply, Grant) else None

    def send_probe(self, peer: PeerLoad, probe: Probe) -> bool:
        """Ask a peer how its queue looks; its report, if it comes, goes to ``on_load`` (no one
        waits for it: a report that does not come leaves an old view to age out)."""
        link = self.link(peer)
        link.remember_probe(probe.probe_id)
        return self._sender.send(link.steal, [encode(probe)])

    async def _call(self, link: PeerLink, call_id: str, frame: bytes, timeout: float) -> Grant | LoadReport | None:
        future: asyncio.Future[Grant | LoadReport] = asyncio.get_running_loop().create_future()
        link.waiting[call_id] = future
        try:
            if not self._sender.send(link.steal, [frame]):
                return None
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            link.waiting.pop(call_id, None)

    def send_to_origin(self, origin_id: str, message: Message) -> bool:
        """Non-blocking send on the result link; False if there is no live link (counted by caller)."""
        link = self._links.get(origin_id)
        if link is None:
            return False
        return self._sender.send(link.result, [encode(message)])

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()

    async def _read(self, link: PeerLink) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(link.steal, zmq.POLLIN)
        poller.register(link.result, zmq.POLLIN)
        peer = link.peer.node_id.encode()
        while True:
            for sock, _ in await poller.poll():
                frames = await sock.recv_multipart()
                with self._containment.guard("peer-reader", link.peer.name):
                    if sock is link.steal:
                        reply = self._drops.decode("steal-reply", peer, frames, (Grant, LoadReport))
                        if isinstance(reply, Grant):
                            self._deliver_grant(link, reply)
                        elif isinstance(reply, LoadReport):
                            self._deliver_load(link, reply)
                    else:
                        msg = self._drops.decode("result-reply", peer, frames, (Ack, HeartbeatAck, Cancel))
                        if isinstance(msg, (Ack, HeartbeatAck, Cancel)):
                            if msg.origin_id == link.peer.node_id:
                                self._on_origin_message(msg)
                            else:
                                self._drops.refuse("result-reply", peer, "origin id is not the link's node id")

    def _deliver_grant(self, link: PeerLink, grant: Grant) -> None:
        verdict = self._steals.on_grant(grant, link.peer.node_id, time.monotonic())
        if verdict in (GrantVerdict.UNSOLICITED, GrantVerdict.WRONG_VICTIM):  # who may say what: refused
            self._drops.refuse("steal-reply", link.peer.node_id.encode(), f"grant dropped: {verdict.value}")
        if verdict.is_applied:
            self._on_grant(grant)
        if verdict is GrantVerdict.LATE and grant.tasks:
            log.info("late grant %s from %s with %d tasks accepted", grant.steal_id, link.peer.name, len(grant.tasks))
        if verdict in (GrantVerdict.APPLY, GrantVerdict.RESTARTED):  # the caller may still be waiting
            future = link.waiting.get(grant.steal_id)
            if future is not None and not future.done():
                future.set_result(grant)

    def _deliver_load(self, link: PeerLink, report: LoadReport) -> None:
        if report.node_id != link.peer.node_id or report.probe_id not in link.probes:
            return
        self._on_load(report)
        future = link.waiting.get(report.probe_id)
        if future is not None and not future.done():
            future.set_result(report)

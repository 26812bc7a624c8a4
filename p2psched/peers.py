"""Thief-side links to peers: one DEALER to each peer's steal socket and one to its result socket.

A steal is a request/reply on the steal DEALER, matched by steal id. A grant that arrives after
the caller gave up waiting is still handed to ``on_grant`` (its tasks are leased to us, so we
run them rather than let the lease lapse). Acks, heartbeat acks and cancels from origins arrive
on the result DEALER and go to ``on_origin_message``. Each link has one reader loop, started
in the node's task group.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq
import zmq.asyncio

from .policy import PeerLoad
from .protocol import Ack, Cancel, Grant, HeartbeatAck, Message, Steal, encode
from .transport import DropLog, make_socket, send_now

log = logging.getLogger(__name__)

GrantHandler = Callable[[Grant], None]
OriginHandler = Callable[[Ack | HeartbeatAck | Cancel], None]


class PeerLink:
    def __init__(self, ctx: zmq.asyncio.Context, node_id: str, peer: PeerLoad):
        self.peer = peer
        self.steal = make_socket(ctx, zmq.DEALER, node_id.encode())
        self.result = make_socket(ctx, zmq.DEALER, node_id.encode())
        self.steal.connect(peer.steal_endpoint)
        self.result.connect(peer.result_endpoint)
        self.waiting: dict[str, asyncio.Future[Grant]] = {}
        self.reader: asyncio.Task[None] | None = None

    def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        self.steal.close(0)
        self.result.close(0)


class PeerLinks:
    def __init__(self, ctx: zmq.asyncio.Context, node_id: str, drops: DropLog,
                 on_grant: GrantHandler, on_origin_message: OriginHandler):
        self._ctx = ctx
        self._node_id = node_id
        self._drops = drops
        self._on_grant = on_grant
        self._on_origin_message = on_origin_message
        self._links: dict[str, PeerLink] = {}
        self._group: asyncio.TaskGroup | None = None

    def start(self, group: asyncio.TaskGroup) -> None:
        self._group = group

    def link(self, peer: PeerLoad) -> PeerLink:
        link = self._links.get(peer.node_id)
        if link is not None and (link.peer.steal_endpoint, link.peer.result_endpoint) != (
                peer.steal_endpoint, peer.result_endpoint):
            link.close()
            link = None
        if link is None:
            assert self._group is not None, "PeerLinks.start() not called"
            link = PeerLink(self._ctx, self._node_id, peer)
            link.reader = self._group.create_task(self._read(link), name=f"peer-{peer.name}")
            self._links[peer.node_id] = link
        link.peer = peer
        return link

    def prune(self, keep: set[str]) -> None:
        """Close links to peers that left the registry and owe us nothing."""
        for node_id in [n for n in self._links if n not in keep]:
            link = self._links.pop(node_id)
            if link.waiting:
                self._links[node_id] = link  # a steal is in flight: keep it for now
                continue
            link.close()

    async def steal(self, peer: PeerLoad, request: Steal, timeout: float) -> Grant | None:
        """Send a steal RPC; the grant, or None on timeout or when the send fails."""
        link = self.link(peer)
        future: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        link.waiting[request.steal_id] = future
        try:
            if not send_now(link.steal, [encode(request)]):
                return None
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            link.waiting.pop(request.steal_id, None)

    def send_to_origin(self, origin_id: str, message: Message) -> bool:
        """Non-blocking send on the result link; False if there is no live link (counted by caller)."""
        link = self._links.get(origin_id)
        if link is None:
            return False
        return send_now(link.result, [encode(message)])

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
                if sock is link.steal:
                    grant = self._drops.decode("steal-reply", peer, frames, (Grant,))
                    if isinstance(grant, Grant):
                        self._deliver_grant(link, grant)
                else:
                    msg = self._drops.decode("result-reply", peer, frames, (Ack, HeartbeatAck, Cancel))
                    if isinstance(msg, (Ack, HeartbeatAck, Cancel)):
                        self._on_origin_message(msg)

    def _deliver_grant(self, link: PeerLink, grant: Grant) -> None:
        self._on_grant(grant)
        future = link.waiting.get(grant.steal_id)
        if future is not None and not future.done():
            future.set_result(grant)
        elif grant.tasks:
            log.info("late grant %s from %s with %d tasks accepted", grant.steal_id, link.peer.name, len(grant.tasks))

"""Fuzzing a live node's ZeroMQ sockets (hypothesis) with real DEALER sockets.

Frames go to both ROUTER sockets of node0 in a two-node cluster: arbitrary bytes, multi-frame
messages, msgpack maps that look like messages, valid messages with one value changed, valid
messages of every type (so also of the wrong type for the socket), and valid messages sent from
a connection whose identity is their ``thief_id`` (so they pass the identity check and reach
the scheduler). Afterwards node0 lives, is healthy, counted what it had to drop, serves a
request exactly, and still steals and is stolen from.

What a valid message from an unknown thief gets (a grant, an ``unknown_peer`` refusal, a
cancel) is not asserted here: only that the node survives it and counts it at most once.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2psched.cluster import Cluster, NodeProcess
from p2psched.core import protocol
from p2psched.core.errors import ProtocolError

from ..fuzz_strategies import invalid_frames, message_types, messages, strategy_for
from .helpers import complete, expected_for, wait_for

NODE_ARGS = ["--engine", "sim", "--heartbeat-interval", "0.3", "--lease-timeout", "1.0", "--steal-timeout", "0.2",
             "--scheduler-min-load-score", "2", "--max-num-seqs", "4", "--sim-decode-step-ms", "4"]
SOCKETS = ("steal", "result")
# Connection identities for messages that name their sender: ASCII, long, multi-byte UTF-8.
THIEF_IDS = ["fuzz-thief-a", "fuzz-thief-b", "t" * 128, "vol\u00e9-\u6f22\u5b57-thief"]


@dataclass
class Send:
    socket: str
    frames: list[bytes]
    identity: str | None = None  # None: the shared anonymous connection

    def is_malformed(self) -> bool:
        """Certainly counted as malformed: not one frame, or a frame that does not decode."""
        if len(self.frames) != 1:
            return True
        try:
            protocol.decode(self.frames[0])
        except ProtocolError:
            return True
        return False

    def short(self) -> str:
        return f"{self.socket} as {self.identity!r}: {[f[:80] for f in self.frames]!r}"


def _encoded(message: protocol.Message) -> bytes:
    try:
        return protocol.encode(message)
    except ProtocolError:  # an encoder that refuses: send the raw bytes anyway, a peer might
        return msgspec.msgpack.encode(message)


def _messages_naming_a_thief() -> st.SearchStrategy[tuple[str, bytes]]:
    """(identity, frame): a valid message whose ``thief_id`` is the connection's identity."""
    kinds = [m for m in message_types() if any(f.name == "thief_id" for f in m.fields)]
    return st.tuples(st.sampled_from(THIEF_IDS), st.one_of([strategy_for(m) for m in kinds])).map(
        lambda pair: (pair[0], _encoded(msgspec.structs.replace(pair[1], thief_id=pair[0]))))


def sends() -> st.SearchStrategy[Send]:
    socket = st.sampled_from(SOCKETS)
    frame = st.one_of(invalid_frames(), messages().map(_encoded))
    return st.one_of(
        st.builds(lambda s, f: Send(s, [f]), socket, invalid_frames()),
        st.builds(lambda s, m: Send(s, [_encoded(m)]), socket, messages()),
        st.builds(lambda s, fs: Send(s, fs), socket, st.lists(frame, min_size=2, max_size=4)),  # multi-frame
        st.builds(lambda s, f: Send(s, [b"", f]), socket, frame),  # REQ-style empty delimiter first
        st.builds(lambda s, pair: Send(s, [pair[1]], pair[0]), socket, _messages_naming_a_thief()),
        st.builds(lambda s, pair: Send(s, [pair[1]], pair[0]), socket, _messages_naming_a_thief()),  # twice the weight
    )


@dataclass
class Client:
    """DEALER sockets to node0: one anonymous per ROUTER, one per (ROUTER, thief identity)."""

    endpoints: dict[str, str]
    ctx: zmq.Context = field(default_factory=zmq.Context)
    socks: dict[tuple[str, str | None], zmq.Socket] = field(default_factory=dict)

    def send(self, send: Send) -> None:
        key = (send.socket, send.identity)
        sock = self.socks.get(key)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.setsockopt(zmq.RCVHWM, 100)  # replies pile up unread; let ZeroMQ drop the excess
            if send.identity is not None:
                sock.setsockopt(zmq.ROUTING_ID, send.identity.encode())
            sock.connect(self.endpoints[send.socket])
            self.socks[key] = sock
        sock.send_multipart(send.frames)

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()  # with linger: what was sent is still delivered
        self.ctx.term()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    cluster = Cluster(2, NODE_ARGS, topic=f"fuzz{uuid.uuid4().hex[:8]}",
                      log_dir=str(tmp_path_factory.mktemp("fuzz-sockets")))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _malformed(node: NodeProcess) -> Counter[str]:
    return Counter(node.stats()["stats"]["malformed"])


def _alive(node: NodeProcess, recent: list[Send]) -> None:
    last = "\n".join(s.short() for s in recent[-5:])
    assert node.proc is not None and node.proc.poll() is None, \
        f"{node.name} died; last frames sent:\n{last}\nlog:\n{node.log_text()[-4000:]}"


def test_fuzzed_frames_are_counted_and_dropped(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    info = node.stats()
    before = _malformed(node)
    client = Client({"steal": info["steal_endpoint"], "result": info["result_endpoint"]})
    sent: list[Send] = []

    @settings(derandomize=True, database=None, deadline=None, max_examples=300,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(sends())
    def fuzz(send: Send) -> None:
        client.send(send)
        sent.append(send)

    try:
        fuzz()
    finally:
        client.close()
    _alive(node, sent)

    certain = Counter(s.socket for s in sent if s.is_malformed())
    decodable = Counter(s.socket for s in sent if not s.is_malformed())
    assert certain["steal"] > 0 and certain["result"] > 0 and decodable["steal"] > 0, (certain, decodable)

    def grown() -> Counter[str]:
        _alive(node, sent)
        delta = _malformed(node) - before
        return delta if all(delta[s] >= certain[s] for s in SOCKETS) else Counter()

    delta = wait_for(grown, timeout=30)
    for name in SOCKETS:  # each frame is counted once at most; a valid one may be counted (wrong type)
        assert certain[name] <= delta[name] <= certain[name] + decodable[name], (name, delta, certain, decodable)
    stats = node.stats()["stats"]
    assert stats.get("loop_errors", {}) == {}, (stats, node.log_text()[-4000:])
    assert node.is_healthy()


def _run_batch(origin: NodeProcess, first: int, count: int, max_tokens: int) -> Counter[str]:
    """Send ``count`` requests at once to ``origin``; check every token; who served them."""
    with ThreadPoolExecutor(count) as pool:
        bodies = list(pool.map(lambda i: complete(origin.url, i, max_tokens), range(first, first + count)))
    served_by: Counter[str] = Counter()
    for i, body in zip(range(first, first + count), bodies):
        assert body["choices"][0]["token_ids"] == expected_for(i, max_tokens), f"request {i}"
        assert body["p2psched"]["origin"] == origin.name
        served_by[body["p2psched"]["served_by"]] += 1
    return served_by


def test_the_fuzzed_node_serves_steals_and_is_stolen_from(cluster: Cluster) -> None:
    """Runs after the fuzz, whatever it found."""
    node0, node1 = cluster.nodes
    _alive(node0, [])
    assert node0.is_healthy() and node1.is_healthy()
    body = complete(node0.url, 5, 12)
    assert body["choices"][0]["token_ids"] == expected_for(5, 12)
    # node0 loaded: node1 steals from it (node0's steal socket and result socket at work).
    served = _run_batch(node0, 100, 24, 40)
    assert served["node1"] > 0, served
    # node1 loaded: node0 steals (its links, and its engine, after the fuzz).
    served = _run_batch(node1, 200, 24, 40)
    assert served["node0"] > 0, served
    for node in (node0, node1):
        stats = node.stats()
        assert stats["stats"].get("loop_errors", {}) == {}, stats["stats"]
        assert stats["stats"]["failed"] == 0, stats["stats"]

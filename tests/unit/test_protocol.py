import random

import msgspec
import pytest

from p2psched import PROTOCOL_VERSION
from p2psched.core.errors import ProtocolError
from p2psched.core.protocol import (
    MAX_FRAME_BYTES,
    Ack,
    Cancel,
    Grant,
    Handback,
    HandbackItem,
    Heartbeat,
    HeartbeatAck,
    LeaseRef,
    LoadReport,
    Probe,
    Sampling,
    Steal,
    Task,
    TokenItem,
    Tokens,
    decode,
    encode,
)

V = PROTOCOL_VERSION
SAMPLING = Sampling(max_tokens=8, seed=42, temperature=0.7, top_p=0.9, top_k=5, stop_token_ids=[2])
TASK = Task("origin-1", "origin", "node0", 3, [1, 2, 3], [7], SAMPLING, 1e9)

MESSAGES = [
    Steal(V, "s1", "victim", "thief", "node1", "model", 4, 1000, 4096),
    Grant(V, "s1", "victim", [TASK], 5),
    Grant(V, "s2", "victim", [], 0, "empty"),
    Tokens(V, "thief", "node1", [TokenItem("origin-1", 3, 0, [5, 6]), TokenItem("origin-2", 0, 9, [1], "length", 10)]),
    Heartbeat(V, "thief", [LeaseRef("origin-1", 3), LeaseRef("origin-2", 0, True)]),
    Handback(V, "thief", [HandbackItem("origin-1", 3, "cannot_run"), HandbackItem("origin-2", 0, "expired")]),
    Probe(V, "p1", "thief"),
    LoadReport(V, "p1", "victim", 7, 700, 3),
    HeartbeatAck(V, "origin", ["origin-1"]),
    Ack(V, "origin", ["origin-1"]),
    Cancel(V, "origin", "origin-1", 3, "client_gone"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    assert decode(encode(message)) == message


def _raw(**fields):
    return msgspec.msgpack.encode(fields)


def _steal_fields(**override):
    fields = {"t": "steal", "v": V, "steal_id": "s", "victim_id": "v", "thief_id": "t", "thief_name": "n", "model_id": "m",
              "max_requests": 1, "max_tokens": 10, "max_model_len": 100}
    fields.update(override)
    return fields


@pytest.mark.parametrize("frame, reason", [
    (b"", "undecodable"),
    (b"\xc1", "undecodable"),
    (_raw(t="nope", v=V), "invalid message"),
    (_raw(v=V), "invalid message"),
    (msgspec.msgpack.encode([1, 2, 3]), "invalid message"),
    (_raw(**_steal_fields(v=V + 1)), "protocol version"),
    (_raw(**_steal_fields(max_requests="many")), "invalid message"),
    (_raw(**_steal_fields(max_requests=0)), "invalid message"),
    (_raw(**_steal_fields(max_tokens=-1)), "invalid message"),
    (_raw(**_steal_fields(steal_id="")), "invalid message"),
    (_raw(**_steal_fields(steal_id="x" * 129)), "invalid message"),
    (_raw(**_steal_fields(extra=1)), "invalid message"),
    (_raw(t="tokens", v=V, thief_id="t", thief_name="n", items=[]), "invalid message"),
    (_raw(t="tokens", v=V, thief_id="t", thief_name="n",
          items=[{"request_id": "r", "epoch": 0, "seq": 0, "token_ids": [-1]}]), "invalid message"),
    (_raw(t="tokens", v=V, thief_id="t", thief_name="n",
          items=[{"request_id": "r", "epoch": 0, "seq": 0, "token_ids": [1], "finish_reason": "boom"}]),
     "invalid message"),
    (b"\x00" * (MAX_FRAME_BYTES + 1), "exceeds"),
])
def test_malformed_frames_raise_protocol_error(frame, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode(frame)


def test_random_bytes_never_escape_as_other_exceptions():
    rng = random.Random(7)
    for _ in range(2000):
        frame = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
        try:
            decode(frame)
        except ProtocolError:
            pass

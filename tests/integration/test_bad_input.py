"""Garbage on every input: ZeroMQ sockets count and drop it, HTTP answers 4xx; the node serves on."""

from __future__ import annotations

import json
import os
import random
import time
import urllib.request

import msgspec
import pytest
import zmq

from p2psched import PROTOCOL_VERSION
from p2psched.cluster import http_json
from p2psched.core.protocol import MAX_FRAME_BYTES, Steal, encode
from p2psched.transport import ZMQ_MAXMSGSIZE

from .helpers import complete, expected_for

GARBAGE = [
    os.urandom(37),  # random bytes
    b"",
    msgspec.msgpack.encode({"t": "steal", "v": PROTOCOL_VERSION, "steal_id": 5}),  # wrong types
    msgspec.msgpack.encode({"t": "what", "v": PROTOCOL_VERSION}),  # unknown type
    encode(Steal(PROTOCOL_VERSION + 7, "s", "v", "t", "n", "m", 1, 1, 1)),  # unknown version
    b"\x91" + b"\x00" * (MAX_FRAME_BYTES + 10),  # oversized (under ZeroMQ's hard cap)
]


def test_garbage_on_both_zmq_sockets_is_counted_and_dropped(cluster_factory):
    cluster = cluster_factory(1)
    node = cluster.nodes[0]
    info = node.stats()
    ctx = zmq.Context.instance()
    socks = []
    for endpoint in (info["steal_endpoint"], info["result_endpoint"]):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(endpoint)
        socks.append(sock)
        for frame in GARBAGE:
            sock.send(frame)
        sock.send_multipart([b"two", b"frames"])
        sock.send(b"\xc1")  # a reserved msgpack byte
    expected = len(GARBAGE) + 2

    def counted():
        malformed = node.stats()["stats"]["malformed"]
        return malformed.get("steal", 0) >= expected and malformed.get("result", 0) >= expected

    deadline = time.monotonic() + 10
    while not counted() and time.monotonic() < deadline:
        time.sleep(0.05)
    malformed = node.stats()["stats"]["malformed"]
    assert malformed == {"steal": expected, "result": expected}

    # A frame past ZeroMQ's own cap only costs the sender its connection.
    huge = ctx.socket(zmq.DEALER)
    huge.setsockopt(zmq.LINGER, 1000)
    huge.connect(info["steal_endpoint"])
    huge.send(b"\x00" * (ZMQ_MAXMSGSIZE + 1))
    # A result message from a peer whose identity does not match its thief id is refused too.
    liar = ctx.socket(zmq.DEALER)
    liar.setsockopt(zmq.ROUTING_ID, b"someone-else")
    liar.setsockopt(zmq.LINGER, 1000)
    liar.connect(info["result_endpoint"])
    from p2psched.core.protocol import TokenItem, Tokens

    liar.send(encode(Tokens(PROTOCOL_VERSION, "a-thief", "x", [TokenItem("r", 0, 0, [1])])))
    deadline = time.monotonic() + 10
    while node.stats()["stats"]["unauthorized"].get("result", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.stats()["stats"]["unauthorized"] == {"result": 1}  # well-formed, but not its to send
    assert node.stats()["stats"]["malformed"] == {"steal": expected, "result": expected}

    body = complete(node.url, 3, 12)
    assert body["choices"][0]["token_ids"] == expected_for(3, 12)
    for sock in [*socks, huge, liar]:
        sock.close()


def _post_raw(url: str, data: bytes, path: str = "/v1/completions") -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


BAD_BODIES = [  # (body, status, param): 400 bad value, 422 wrong shape, 404 unknown model, 413 too large
    (b"{not json", 400, None),
    (b"[1, 2]", 422, None),
    (json.dumps({"max_tokens": 5}).encode(), 422, "prompt"),
    (json.dumps({"prompt": 17}).encode(), 422, "prompt"),
    (json.dumps({"prompt": "hi", "max_tokens": "ten"}).encode(), 422, "max_tokens"),
    (json.dumps({"prompt": "hi", "stream": "yes"}).encode(), 422, "stream"),
    (json.dumps({"prompt": "hi", "max_tokens": -3}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "hi", "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "hi", "n": 2}).encode(), 400, "n"),
    (json.dumps({"prompt": [1, -2]}).encode(), 400, "prompt"),
    (json.dumps({"prompt": [10**9]}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "hi", "model": "gpt-7"}).encode(), 404, "model"),
    (json.dumps({"prompt": "x" * 5000, "max_tokens": 10}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "x" * (9 * 1024 * 1024)}).encode(), 413, None),
]


@pytest.mark.parametrize("body, status, param", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_bad_http_bodies_get_openai_errors(shared_node, body, status, param):
    got_status, payload = _post_raw(shared_node.url, body)
    assert got_status == status, payload
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["message"]
    assert payload["error"]["param"] == param
    # ...and the node keeps serving.
    ok = complete(shared_node.url, 1, 4)
    assert ok["choices"][0]["token_ids"] == expected_for(1, 4)


BAD_CHATS = [
    ({"max_tokens": 3}, 422, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hello"}, 422, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ({"messages": [{"role": "user"}]}, 422, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "nope"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400, "max_completion_tokens"),
]


@pytest.mark.parametrize("body, status, param", BAD_CHATS, ids=range(len(BAD_CHATS)))
def test_bad_chat_bodies_get_openai_errors(shared_node, body, status, param):
    got_status, payload = _post_raw(shared_node.url, json.dumps(body).encode(), "/v1/chat/completions")
    assert (got_status, payload["error"]["param"]) == (status, param), payload
    ok_status, ok = _post_raw(shared_node.url, json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "still "}, {"type": "text", "text": "here?"}]}],
        "max_tokens": 3}).encode(), "/v1/chat/completions")
    assert ok_status == 200 and ok["choices"][0]["message"]["role"] == "assistant"


def test_unknown_route_is_an_openai_404(shared_node):
    status, payload = http_json(shared_node.url + "/v1/nothing-here")
    assert status == 404 and "error" in payload


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory):
    from p2psched.cluster import Cluster

    cluster = Cluster(1, ["--engine", "sim"], scheduler_name="local",
                      log_dir=str(tmp_path_factory.mktemp("shared")))
    try:
        yield cluster.start().nodes[0]
    finally:
        cluster.stop()


def test_random_http_bytes_never_crash_the_node(shared_node):
    rng = random.Random(3)
    for _ in range(30):
        status, _ = _post_raw(shared_node.url, bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200))))
        assert status in (400, 422)
    assert shared_node.is_healthy()

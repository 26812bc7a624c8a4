"""Client-side helpers for integration tests: requests, streams, expected sim tokens."""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from p2psched.cluster import http_json
from p2psched.sim_engine import SimTokenizer, expected_tokens

VOCAB = 32000


def prompt_for(i: int) -> str:
    return f"request number {i}: tell me a story"


def expected_for(i: int, max_tokens: int) -> list[int]:
    return expected_tokens(i, SimTokenizer().encode(prompt_for(i)), max_tokens, VOCAB)


def complete(url: str, i: int, max_tokens: int) -> dict[str, Any]:
    status, body = http_json(url + "/v1/completions", {
        "model": "sim", "prompt": prompt_for(i), "max_tokens": max_tokens, "seed": i, "return_token_ids": True})
    assert status == 200, body
    return body


def stream(url: str, i: int, max_tokens: int, timeout: float = 60) -> tuple[list[list[int]], dict[str, Any]]:
    """Stream a completion; returns the token ids of each chunk and the final chunk."""
    body = json.dumps({"prompt": prompt_for(i), "max_tokens": max_tokens, "seed": i, "stream": True,
                       "return_token_ids": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    chunks: list[list[int]] = []
    last: dict[str, Any] = {}
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        assert resp.status == 200
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            payload = json.loads(data)
            assert "error" not in payload, payload
            choice = payload["choices"][0]
            chunks.append(choice["token_ids"])
            last = payload
    return chunks, last


T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 60.0, interval: float = 0.02) -> T:
    """Poll until ``predicate()`` is truthy; its value, or AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def register_fake_peer(cluster: Any, node_id: str, model_id: str, name: str = "fake", public_key: str = "") -> None:
    """Write a registry record for a raw ZeroMQ test peer, so nodes treat it as a registered peer
    (steals are served only to those). Its endpoints point nowhere; it only sends."""
    import asyncio

    from p2psched import PROTOCOL_VERSION
    from p2psched.core.config import SchedulerConfig
    from p2psched.registry import NodeRecord, Registry

    topic = cluster.nodes[0].args[cluster.nodes[0].args.index("--scheduler-topic") + 1]
    record = NodeRecord(node_id, name, PROTOCOL_VERSION, model_id, "tcp://127.0.0.1:9", "tcp://127.0.0.1:9", "",
                        time.time(), public_key=public_key)

    async def write() -> None:
        registry = Registry(dataclasses.replace(SchedulerConfig(), port=cluster.redis.port, topic=topic,
                                                heartbeat_interval=100.0))
        try:
            await registry.heartbeat(record)
        finally:
            await registry.close()

    asyncio.run(write())

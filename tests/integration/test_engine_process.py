"""The engine in its own process: a crash fails requests loudly, and the node leaves."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from p2psched.core.config import SchedulerConfig
from p2psched.registry import Registry

from .helpers import prompt_for, wait_for


def _stream_outcome(url: str, i: int, max_tokens: int) -> str:
    """'done', 'error' (an error event or a non-200 answer) or 'cut' (the stream ended silently)."""
    body = json.dumps({"prompt": prompt_for(i), "max_tokens": max_tokens, "seed": i, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    return "done"
                if line.startswith("data: ") and "error" in json.loads(line[6:]):
                    return "error"
    except urllib.error.HTTPError:
        return "error"
    return "cut"


def test_engine_process_crash_fails_requests_deregisters_and_exits(cluster_factory):
    cluster = cluster_factory(1, extra=["--sim-decode-step-ms", "20"])
    node = cluster.nodes[0]
    snapshot = node.stats()
    engine_pid = snapshot["engine_pid"]
    assert engine_pid and engine_pid != node.pid
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(_stream_outcome, node.url, i, 400) for i in range(6)]
        wait_for(lambda: node.stats()["load"]["running"] > 0)
        os.kill(engine_pid, signal.SIGKILL)
        outcomes = [f.result(timeout=30) for f in futures]
    assert outcomes == ["error"] * 6  # every in-flight client was told; none was left hanging or cut
    assert node.proc is not None and node.proc.wait(timeout=30) == 1
    assert "engine process exited unexpectedly" in node.log_text()

    async def listed() -> list[str]:
        registry = Registry(SchedulerConfig(name="global", host=cluster.redis.host, port=cluster.redis.port,
                                            topic=cluster.topic))
        try:
            return [record.node_id for record in await registry.nodes()]
        finally:
            await registry.close()

    assert snapshot["node_id"] not in asyncio.run(listed())


def test_engine_exits_when_its_node_is_killed(cluster_factory):
    cluster = cluster_factory(1, extra=["--sim-decode-step-ms", "20"])
    node = cluster.nodes[0]
    engine_pid = node.stats()["engine_pid"]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_stream_outcome, node.url, i, 400) for i in range(2)]
        wait_for(lambda: node.stats()["load"]["running"] > 0)
        node.kill()  # SIGKILL of the node while its engine has work
        for f in futures:
            f.result(timeout=30)

    def gone() -> bool:
        try:
            os.kill(engine_pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{engine_pid}/stat") as stat:  # a zombie waiting for its reaper is gone too
            return stat.read().split(") ")[1].startswith("Z")

    wait_for(gone, timeout=10)

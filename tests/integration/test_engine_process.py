"""The engine in its own process: a crash fails requests loudly, and the node leaves."""

from __future__ import annotations

import asyncio
import glob
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from p2psched.core.config import SchedulerConfig
from p2psched.registry import Registry

from .helpers import prompt_for, wait_for


def _stream_outcome(url: str, i: int, max_tokens: int) -> str:
    """'done', 'error' (an error event or a non-200 answer) or 'cut' (the stream ended without
    a word, the connection dropped, or nothing answered)."""
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
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError):
        return "cut"
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
    ipc_dirs = set(glob.glob(os.path.join(tempfile.gettempdir(), "p2ps-engine-*")))
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_stream_outcome, node.url, i, 400) for i in range(2)]
        wait_for(lambda: node.stats()["load"]["running"] > 0)
        node.kill()  # SIGKILL of the node while its engine has work
        assert [f.result(timeout=30) for f in futures] == ["cut", "cut"]

    def gone() -> bool:
        try:
            os.kill(engine_pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{engine_pid}/stat") as stat:  # a zombie waiting for its reaper is gone too
            return stat.read().split(") ")[1].startswith("Z")

    wait_for(gone, timeout=10)
    left = set(glob.glob(os.path.join(tempfile.gettempdir(), "p2ps-engine-*")))
    assert len(ipc_dirs - left) == 1  # the engine removed its sockets' folder on its way out


def test_a_node_that_exits_without_closing_its_engine_does_not_hang(tmp_path):
    """The engine ignores SIGTERM and SIGINT (its node drains first): an exit path that never
    reached close() (Ctrl-C while the model loads, an error building the node) must still kill
    it, not wait on it forever in multiprocessing's exit handler."""
    script = tmp_path / "exit_early.py"
    script.write_text(textwrap.dedent("""
        from p2psched.engine_client import EngineClient
        from p2psched.server import build_parser, config_from_args

        if __name__ == "__main__":
            client = EngineClient(config_from_args(build_parser().parse_args(["--scheduler-name", "local"])))
            client.start()
            print(client.pid, flush=True)
            raise SystemExit(3)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    engine_pid = int(done.stdout.split()[0])
    try:
        os.kill(engine_pid, 0)
    except ProcessLookupError:
        pass
    else:
        raise AssertionError(f"engine process {engine_pid} outlived its node")

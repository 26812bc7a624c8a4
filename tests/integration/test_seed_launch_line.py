"""FastDeploy's load-balancing launch line, verbatim but for the ports and the model path, starts a
node of the seed's model family (ERNIE 4.5, random weights) that registers and serves."""

from __future__ import annotations

import shlex

from p2psched.cluster import NodeProcess, http_json
from p2psched.redis_server import EmbeddedRedis, free_port
from tests.unit.test_config import SEED_LAUNCH_LINE
from tests.unit.test_parity import checkpoint

from .helpers import wait_for


def test_the_seed_launch_line_starts_a_node_that_registers_and_serves(tmp_path):
    model_dir = tmp_path / "ERNIE-4.5-0.3B-random"
    checkpoint(model_dir, "ernie", tie=True)
    with EmbeddedRedis() as redis:
        http, metrics, queue = free_port(), free_port(), free_port()
        substitutes = {"8801": str(http), "8802": str(metrics), "8803": str(queue), "6379": str(redis.port),
                       "baidu/ERNIE-4.5-0.3B-Paddle": str(model_dir)}
        args = [substitutes.get(word, word) for word in shlex.split(SEED_LAUNCH_LINE)]
        assert len(args) == len(shlex.split(SEED_LAUNCH_LINE)) and sum(a != b for a, b in zip(
            args, shlex.split(SEED_LAUNCH_LINE))) == len(substitutes)  # each substitute replaced exactly once
        (tmp_path / "cluster0").mkdir()
        node = NodeProcess("seed", http, args, tmp_path / "cluster0" / "seed.log")
        node.start()
        try:
            node.wait_healthy(120)
            keys = [key.decode() for key in redis.admin_client().scan_iter("p2psched:{default.0}:node:*")]
            assert len(keys) == 1, keys
            record = redis.admin_client().hgetall(keys[0])
            assert record[b"http_url"] == f"http://127.0.0.1:{http}".encode()  # Redis on loopback: so is the node
            status, models = http_json(node.url + "/v1/models")
            assert status == 200 and len(models["data"]) == 1, models
            status, body = http_json(node.url + "/v1/completions", {"model": models["data"][0]["id"],
                                                                    "prompt": "t1 t2 t3", "max_tokens": 6})
            assert status == 200, body
            assert body["usage"]["completion_tokens"] == 6
            text = wait_for(lambda: _get(f"http://127.0.0.1:{metrics}/metrics"), timeout=10)
            assert "p2psched_" in text
            assert f"--engine-worker-queue-port {queue} is FastDeploy's" in node.log_text()
            assert "not applicable" in node.log_text()
        finally:
            node.terminate(60)
    assert node.proc is not None and node.proc.returncode == 0


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()

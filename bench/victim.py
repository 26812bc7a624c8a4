"""A victim node for bench/rpc_latency.py: a real node (sim engine, local scheduler) whose queue
is pre-filled with requests, so every steal RPC gets a real one-task grant.

    python -m bench.victim N THIEF_ID [CURVE_KEY_FILE CURVE_ALLOW_DIR THIEF_PUBLIC_KEY]

The thief is made a known peer (steals are served only to registered peers; this node has no
registry). Prints its steal and result endpoints, model id and public key as one JSON line,
then serves until killed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from p2psched.core.config import NodeConfig, SchedulerConfig, SimEngineConfig
from p2psched.core.policy import PeerLoad
from p2psched.core.protocol import Sampling
from p2psched.server import build_node
from server.engine_config import EngineConfig


async def main(num_requests: int, thief_id: str, curve: list[str]) -> None:
    key_file, allow_dir, thief_key = curve if curve else ("", "", "")
    config = NodeConfig(port=0, engine="sim", engine_config=EngineConfig(max_num_seqs=1),
                        max_queue_len=num_requests + 1, curve_key_file=key_file,
                        curve_allow_dir=allow_dir, scheduler=SchedulerConfig(name="local", ttl=1e6, lease_timeout=1e6),
                        sim=SimEngineConfig(decode_step_ms=10_000))
    node = build_node(config)
    node.add_static_peer(PeerLoad(thief_id, "bench", node.engine.model_id, "tcp://127.0.0.1:9", "tcp://127.0.0.1:9",
                                  0, public_key=thief_key))
    for i in range(num_requests):
        node.scheduler.submit(f"bench-{i}", [1 + i % 200] * 64, Sampling(max_tokens=16, seed=i), time.time())
    runner = asyncio.create_task(node.run())
    await node.ready.wait()
    print(json.dumps({"node_id": node.node_id, "steal": node.steal_endpoint, "result": node.result_endpoint,
                      "model_id": node.engine.model_id,
                      "public_key": node.curve.public_key if node.curve else ""}), flush=True)
    await runner


if __name__ == "__main__":
    arguments = (int(sys.argv[1]), sys.argv[2], sys.argv[3:6])
    try:
        import uvloop

        uvloop.run(main(*arguments))
    except ImportError:
        asyncio.run(main(*arguments))

"""A victim node for bench/rpc_latency.py: a real node (sim engine, local scheduler) whose queue
is pre-filled with requests, so every steal RPC gets a real one-task grant.

Prints its steal and result endpoints and model id as one JSON line, then serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import time
import sys

from p2psched.config import NodeConfig, SchedulerConfig, SimEngineConfig
from p2psched.protocol import Sampling
from p2psched.server import build_node


async def main(num_requests: int) -> None:
    config = NodeConfig(port=0, max_num_seqs=1, max_queue_len=num_requests + 1,
                        scheduler=SchedulerConfig(name="local", ttl=1e6, lease_timeout=1e6),
                        sim=SimEngineConfig(decode_step_ms=10_000))
    node = build_node(config)
    for i in range(num_requests):
        node.scheduler.submit(f"bench-{i}", [1 + i % 200] * 64, Sampling(max_tokens=16, seed=i), time.time())
    runner = asyncio.create_task(node.run())
    await node.ready.wait()
    print(json.dumps({"steal": node.steal_endpoint, "result": node.result_endpoint,
                      "model_id": node.engine.model_id}), flush=True)
    await runner


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main(int(sys.argv[1])))
    except ImportError:
        asyncio.run(main(int(sys.argv[1])))

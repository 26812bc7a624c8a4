"""The seed scenario: N nodes behind round-robin, equal request counts, heavy-tailed outputs.

This is the operator's problem in miniature: nginx gives every node the same number of
requests, but output lengths follow a Pareto tail, so some nodes receive far more work than
others. ``run_phase`` starts a real local cluster (embedded Redis, node processes), sends the
workload at a steady rate, and returns per-request latencies and per-node counters.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from rich.progress import Progress

from p2psched.cluster import Cluster

COMMON_ARGS = ["--scheduler-min-load-score", "2", "--heartbeat-interval", "0.5"]
ENGINE_ARGS = {
    # The real tiny model, one torch thread per node. A tiny-model step takes ~3 ms of CPU; steps
    # are paced to 20 ms so that three nodes on a 2-core machine behave like three accelerators
    # (otherwise they compete for the same cores and no node is ever really idle).
    "real": ["--engine", "real", "--model", "tiny", "--cpu-threads", "1", "--max-num-seqs", "4",
             "--min-step-ms", "20"],
    # the cost model standing in for a GPU step of ~20 ms
    "sim": ["--engine", "sim", "--max-num-seqs", "4", "--sim-decode-step-ms", "20", "--sim-decode-ms-per-seq", "1"],
}


@dataclass(frozen=True)
class Item:
    index: int
    node: int  # round-robin target
    prompt: str
    max_tokens: int
    send_at: float  # seconds after the start


def workload(num_requests: int, num_nodes: int, rate: float, seed: int = 1) -> list[Item]:
    """Round-robin targets, Pareto(alpha=1.1) output lengths in [6, 400], steady arrivals."""
    rng = random.Random(seed)
    items = []
    for i in range(num_requests):
        length = min(400, int(6 * rng.paretovariate(1.1)))
        prompt = f"seed scenario request {i} " + "x" * rng.randrange(0, 200)
        items.append(Item(i, i % num_nodes, prompt, length, i / rate))
    return items


@dataclass
class PhaseResult:
    name: str
    tokens: dict[int, list[int]] = field(default_factory=dict)
    latencies: dict[int, float] = field(default_factory=dict)  # end to end
    ttfts: dict[int, float] = field(default_factory=dict)  # time to first token
    spans: dict[int, tuple[float, float, float]] = field(default_factory=dict)  # sent, first token, done (s)
    served_by: dict[int, str] = field(default_factory=dict)
    node_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    wall_s: float = 0.0
    mismatches: int = 0
    errors: int = 0


async def _send(session: aiohttp.ClientSession, url: str, item: Item, start: float, result: PhaseResult,
                progress: Progress, task: Any) -> None:
    await asyncio.sleep(max(0.0, start + item.send_at - time.monotonic()))
    sent = time.monotonic()
    body = {"prompt": item.prompt, "max_tokens": item.max_tokens, "seed": item.index, "return_token_ids": True,
            "stream": True, "ignore_eos": True, "temperature": 0.8}
    tokens: list[int] = []
    last: dict[str, Any] = {}
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            result.errors += 1
            progress.advance(task)
            return
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            last = json.loads(line[6:])
            if "error" in last:
                result.errors += 1
                break
            if not tokens:
                result.ttfts[item.index] = time.monotonic() - sent
            tokens += last["choices"][0]["token_ids"]
    done = time.monotonic()
    result.latencies[item.index] = done - sent
    first = sent + result.ttfts.get(item.index, done - sent)
    result.spans[item.index] = (sent - start, first - start, done - start)
    result.served_by[item.index] = last.get("p2psched", {}).get("served_by", "?")
    result.tokens[item.index] = tokens
    progress.advance(task)


async def _drive(cluster: Cluster, items: list[Item], result: PhaseResult, progress: Progress) -> None:
    task = progress.add_task(f"{result.name:>13}", total=len(items))
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.monotonic()
        await asyncio.gather(*(_send(session, cluster.nodes[it.node].url, it, start, result, progress, task)
                               for it in items))
        result.wall_s = time.monotonic() - start


def run_phase(name: str, stealing: bool, items: list[Item], num_nodes: int, progress: Progress,
              engine: str = "real", log_dir: str | None = None) -> PhaseResult:
    result = PhaseResult(name)
    args = ENGINE_ARGS[engine] + COMMON_ARGS
    with Cluster(num_nodes, args, scheduler_name="global" if stealing else "local", log_dir=log_dir) as c:
        asyncio.run(_drive(c, items, result, progress))
        result.node_stats = {n.name: n.stats()["stats"] for n in c.nodes}
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")

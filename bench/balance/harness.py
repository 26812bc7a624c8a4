"""The balance bench on real processes: one workload, several schedulers, side by side.

``python -m bench`` (``make bench``) starts an embedded Redis and N node processes for each mode
in turn, sends the same seeded workload (``workload.py``) with every response streamed, and
records, per request, what its client saw (``metrics.RequestRecord``). Modes:

- ``local``: no stealing; the front door's round-robin decides where each request runs.
- ``global``: p2psched's stealing.
- ``fastdeploy``: FastDeploy's Redis global scheduler (``fastdeploy.py``), one per node, in this
  process: requests queue in Redis lists, idle nodes pop or steal them, stolen tokens come back
  through Redis lists. Its nodes run ``local`` and get each request from their scheduler only
  when they have a free slot. The front door here is always the client's round-robin (it only
  names each request's origin).
- ``oracle``: late binding at the client: one queue in arrival order, each request sent the
  moment some node has a free slot (the client counts each node's streams in flight against its
  ``--max-num-seqs``): the bar for waiting time. Its nodes run ``local``.

Before the modes run, the harness measures the cluster's capacity (``measure_capacity``: every
node saturated at once, its step time read off its streams) and sets the arrival rate as a
fraction of it; ``--capacity-rps`` gives it instead. With ``--join-at`` one more node joins
mid-run, with ``--leave-at`` node 1 leaves (SIGTERM: it drains), in every mode (``Membership``).
Per mode the table also gives how many requests waited while some node had a free slot, and
for how long on average, read off the trace (``metrics.idle_slot_waits``): what a perfect
balancer would not have let happen.

The same items also run through the simulator (``simulate.py``) with the same cluster and the
step time the real nodes showed (their mean time per output token), so each real number has
its simulated twin beside it (the simulator's large-cluster numbers are only as good as that
agreement). Redis commands are counted from ``INFO commandstats`` over each
mode's run. Written under ``--out``: ``results.json`` (every record), ``report.md`` (the
table), ``latency_cdf.png`` and ``timeline_<mode>.png``.

The nodes share this machine's cores: with the sim engine a step costs sleep, not CPU, so
the balance is the scheduler's; with ``--engine tiny`` (the real tiny model, one torch thread
per node, steps paced to ``--decode-step-ms``) they compete for the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from p2psched.cluster import Cluster
from p2psched.redis_server import EmbeddedRedis, free_port

from ..netns import lab_cluster, unavailable
from .fastdeploy import Chunk, Engine, Event, FdConfig, FdScheduler
from .metrics import RequestRecord, idle_slot_waits, summarize
from .simulate import ClusterSpec, simulate
from .workload import Item, WorkloadSpec, generate, sim_capacity_rps, total_nodes

MODES = ("local", "global", "fastdeploy", "oracle")


ENGINES = ("sim", "tiny")
JOIN_LEAD_S = 3.0  # a joining node's process starts this long before its first request is due


@dataclasses.dataclass(frozen=True)
class Setup:
    nodes: int = 4
    max_num_seqs: int = 8
    decode_step_ms: float = 20.0  # sim: the cost model's step; tiny: steps paced to at least this
    load: float = 0.9
    num_requests: int = 300
    arrival: str = "poisson"
    seed: int = 1
    min_load_score: int = 1
    target: str = "round_robin"  # or "one_node": every request to node 0
    slow_factor: float = 1.0  # node 0's steps take this many times longer (heterogeneous nodes)
    long_prompt_fraction: float = 0.0  # this share of prompts is 1-2k tokens
    prefill_ms_per_token: float = 0.0  # a step lengthens by this per prompt token it prefills
    engine: str = "sim"  # or "tiny": the real tiny model on CPU, one torch thread per node
    join_at: float | None = None  # one more node joins after this fraction of the requests
    leave_at: float | None = None  # node 1 leaves after this fraction of the requests
    capacity_rps: float | None = None  # given: used as is; None: measured before the run
    rtt_ms: float | None = None  # given: each node and Redis on a host of its own, links delayed (bench/netns.py)

    @property
    def total_nodes(self) -> int:
        return total_nodes(self.work_spec(), self.nodes)

    def per_node_args(self) -> list[list[str]]:
        flag = "--sim-decode-step-ms" if self.engine == "sim" else "--min-step-ms"
        slow = [flag, str(self.decode_step_ms * self.slow_factor)] if self.slow_factor != 1 else []
        return [slow] + [[] for _ in range(self.total_nodes - 1)]

    def node_args(self) -> list[str]:
        common = ["--max-num-seqs", str(self.max_num_seqs), "--scheduler-min-load-score", str(self.min_load_score)]
        if self.engine == "tiny":
            return ["--engine", "real", "--model", "tiny", "--cpu-threads", "1",
                    "--min-step-ms", str(self.decode_step_ms), *common]
        return ["--engine", "sim", "--sim-decode-step-ms", str(self.decode_step_ms), "--sim-decode-ms-per-seq", "0",
                "--sim-decode-ms-per-kilotoken", "0", "--sim-prefill-ms-per-token", str(self.prefill_ms_per_token),
                *common]

    def cluster_spec(self) -> ClusterSpec:
        """The simulator's cluster (every node, a joiner too; joins and leaves are the run's)."""
        base = ClusterSpec()
        cost = dataclasses.replace(base.cost, decode_step_ms=self.decode_step_ms,
                                   prefill_ms_per_token=self.prefill_ms_per_token)
        network = {} if self.rtt_ms is None else {"latency_s": base.latency_s + self.rtt_ms / 2000,
                                                   "redis_latency_s": base.redis_latency_s + self.rtt_ms / 2000}
        return ClusterSpec(nodes=self.total_nodes, max_num_seqs=self.max_num_seqs, cost=cost,
                           slowdowns=(self.slow_factor,), min_load_score=self.min_load_score, seed=self.seed,
                           **network)  # type: ignore[arg-type]

    def work_spec(self) -> WorkloadSpec:
        def index(fraction: float | None) -> int | None:
            return None if fraction is None else min(self.num_requests - 1, max(1, round(fraction * self.num_requests)))
        return WorkloadSpec(num_requests=self.num_requests, arrival=self.arrival, seed=self.seed,  # type: ignore[arg-type]
                            target=self.target, long_prompt_fraction=self.long_prompt_fraction,  # type: ignore[arg-type]
                            join_at=index(self.join_at), leave_at=index(self.leave_at))

    def workload(self, capacity: float) -> tuple[WorkloadSpec, list[Item]]:
        """The items at ``load`` x ``capacity`` requests per second."""
        spec = self.work_spec()
        return spec, generate(spec.at_rate(self.load * capacity), self.nodes)

    def model_capacity(self, step_ms: list[float] | None = None) -> float:
        """Requests per second the ``nodes`` sustain with full batches, from the cost model at
        each node's step time (default: the flags')."""
        spec = self.work_spec()
        total = 0.0
        for n in range(self.nodes):
            node_step = step_ms[n] if step_ms else self.decode_step_ms * (self.slow_factor if n == 0 else 1.0)
            cost = dataclasses.replace(ClusterSpec().cost, decode_step_ms=node_step,
                                       prefill_ms_per_token=self.prefill_ms_per_token)
            total += sim_capacity_rps(cost, self.max_num_seqs, spec, 1)
        return total


CALIBRATION_TOKENS = 48  # output tokens per calibration request


def measure_capacity(setup: Setup, log_dir: Path, progress: Progress) -> tuple[float, list[float]]:
    """The cluster's capacity, measured: every node gets two full batches of requests of the
    workload's mean prompt length at once (no stealing), all nodes together so they share the
    machine as they will in the run; each node's step time is its requests' mean time per output
    token, and the capacity follows from the cost model at those step times. (requests/s, step
    ms per node)."""
    work = setup.work_spec()
    per_node = 2 * setup.max_num_seqs
    task = progress.add_task("capacity", total=per_node * setup.nodes)
    prompt_tokens = max(1, round(work.mean_prompt_tokens))
    with _cluster(setup, setup.nodes, "local", log_dir / "capacity", setup.per_node_args()[:setup.nodes]) as (cluster, _):
        items = [Item(n * per_node + k, 0.0, n, prompt_tokens, CALIBRATION_TOKENS)
                 for n in range(setup.nodes) for k in range(per_node)]

        async def go() -> list[RequestRecord]:
            records = [RequestRecord(item.index, 0.0, cluster.nodes[item.node].name) for item in items]
            timeout = aiohttp.ClientTimeout(total=300)
            async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
                t0 = time.monotonic()

                async def one(item: Item) -> None:
                    await _stream(session, cluster.nodes[item.node].url, item, records[item.index], t0)
                    progress.advance(task)
                await asyncio.gather(*(one(item) for item in items))
            return records

        records = asyncio.run(go())
    failed = [r for r in records if not r.ok]
    if failed:
        raise SystemExit(f"python -m bench: error: {len(failed)} calibration requests failed ({failed[0].error})")
    step_ms = []
    for n in range(setup.nodes):  # (by the node each was sent to: the records are in the items' order)
        tpots = [t for r, item in zip(records, items, strict=True) if item.node == n and (t := r.tpot) is not None]
        if not tpots:
            raise SystemExit(f"python -m bench: error: node{n} streamed no calibration request of two tokens or more "
                             f"(see {log_dir / 'capacity'})")
        step_ms.append(1000 * sum(tpots) / len(tpots))
    return setup.model_capacity(step_ms), step_ms


@dataclasses.dataclass
class ModeRun:
    mode: str
    records: list[RequestRecord]
    redis_commands: int
    redis_cpu_s: float  # the Redis server's CPU time (user + system) over the run
    wall_s: float
    node_stats: dict[str, dict[str, Any]]  # of the nodes still up at the end
    joins: tuple[tuple[int, float], ...] = ()  # (node, seconds into the run) as they happened
    leaves: tuple[tuple[int, float], ...] = ()


def _prompt(item: Item) -> str:
    """``item.prompt_tokens`` bytes (the sim tokenizer is byte-level), distinct per request."""
    head = f"req {item.index} "
    return head + "x" * max(0, item.prompt_tokens - len(head))


def _body(item: Item) -> dict[str, Any]:
    return {"prompt": _prompt(item), "max_tokens": item.max_tokens, "seed": item.seed, "stream": True,
            "ignore_eos": True, "return_token_ids": True}


async def _chunks(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                  on_answer: Callable[[], None] | None = None) -> AsyncIterator[dict[str, Any]]:
    """The streamed completion's chunks (decoded); an error chunk for a refused request.
    ``on_answer`` runs when the node has answered (the response's status line is in)."""
    async with session.post(url + "/v1/completions", json=body) as resp:
        if on_answer is not None:
            on_answer()
        if resp.status != 200:
            yield {"error": {"message": f"HTTP {resp.status}"}}
            return
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


async def _stream(session: aiohttp.ClientSession, url: str, item: Item, record: RequestRecord, t0: float,
                  on_answer: Callable[[], None] | None = None) -> None:
    try:
        async for payload in _chunks(session, url, _body(item), on_answer):
            if "error" in payload:
                record.error = str(payload["error"].get("message", "error"))
                return
            ids = payload["choices"][0].get("token_ids") or []
            if ids:
                record.token_times.append(time.monotonic() - t0)
                record.num_tokens += len(ids)
            if "p2psched" in payload:  # on the last chunk: where it ran, and (behind nginx) where it landed
                record.served_by = payload["p2psched"].get("served_by", "")
                record.origin = payload["p2psched"].get("origin", record.origin)
        record.finish_s = time.monotonic() - t0
    except (aiohttp.ClientError, TimeoutError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"


class Membership:
    """The run's membership changes, on real processes: the joining node's process starts
    ``JOIN_LEAD_S`` before its first request is due (it registers, and the front door sends it
    requests, once it answers /health); the leaving node gets SIGTERM when its first
    out-of-rotation request arrives, once it has answered every request sent to it before (it
    drains what it has and deregisters; peers may take its queue meanwhile). FastDeploy's
    leaving instance only stops taking work."""

    def __init__(self, cluster: Cluster, items: list[Item], setup: Setup, t0: float):
        work = setup.work_spec()
        self.cluster = cluster
        self.t0 = t0
        self.nodes = setup.nodes
        self.joiner = setup.nodes if work.join_at is not None else None
        self.join_due = items[work.join_at].arrival_s if work.join_at is not None else None
        self.leaver = work.leaver if work.leave_at is not None else None
        self.leave_s = items[work.leave_at].arrival_s if work.leave_at is not None else None
        self.joined = asyncio.Event()
        self.joined_s: float | None = None  # when it answered /health (registered: it may steal a poll earlier)
        self.has_left = False
        self.changed = asyncio.Event()
        self.unanswered = [0] * setup.total_nodes  # requests sent to each node it has not answered yet

    def sending(self, node: int) -> Callable[[], None]:
        """Count a request sent to ``node`` until it answers (call what this returns then): a
        leaving node gets SIGTERM only once it has answered every request sent to it before."""
        self.unanswered[node] += 1
        answered = False

        def answer() -> None:
            nonlocal answered
            if not answered:
                answered = True
                self.unanswered[node] -= 1
        return answer

    def live(self) -> list[int]:
        """The nodes that may be given work now."""
        live = [n for n in range(self.nodes) if not (self.has_left and n == self.leaver)]
        return live + ([self.joiner] if self.joiner is not None and self.joined.is_set() else [])

    async def ready(self, node: int) -> None:
        if node == self.joiner:
            await self.joined.wait()

    async def run(self, on_join: Callable[[int], Awaitable[None]] | None = None,
                  on_leave: Callable[[int], Awaitable[None]] | None = None, signal_leaver: bool = True) -> None:
        """The changes at their times; the leaver gets SIGTERM unless ``signal_leaver`` is False
        (FastDeploy's: its scheduler stops taking work, which is its instance leaving)."""
        async def join() -> None:
            assert self.joiner is not None and self.join_due is not None
            await asyncio.sleep(max(0.0, self.t0 + self.join_due - JOIN_LEAD_S - time.monotonic()))
            await asyncio.to_thread(self.cluster.start_node, self.joiner)
            if on_join is not None:
                await on_join(self.joiner)
            self.joined_s = time.monotonic() - self.t0
            self.joined.set()
            self.changed.set()

        async def leave() -> None:
            assert self.leaver is not None and self.leave_s is not None
            await asyncio.sleep(max(0.0, self.t0 + self.leave_s - time.monotonic()))
            self.has_left = True
            if on_leave is not None:
                await on_leave(self.leaver)
            deadline = time.monotonic() + 10
            while self.unanswered[self.leaver] and time.monotonic() < deadline:  # (a draining node refuses new ones)
                await asyncio.sleep(0.005)
            proc = self.cluster.nodes[self.leaver].proc
            if signal_leaver and proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            self.changed.set()

        await asyncio.gather(*([join()] if self.joiner is not None else []),
                             *([leave()] if self.leaver is not None else []))

    def sim_changes(self) -> tuple[tuple[tuple[int, float], ...], tuple[tuple[int, float], ...]]:
        """(joins, leaves) for the simulator's twin, at the times they happened here."""
        joins = ((self.joiner, self.joined_s),) if self.joiner is not None and self.joined_s is not None else ()
        leaves = ((self.leaver, self.leave_s),) if self.leaver is not None and self.leave_s is not None else ()
        return joins, leaves


@contextlib.contextmanager
def _cluster(setup: Setup, num_nodes: int, scheduler: str, log_dir: Path, per_node_args: list[list[str]],
             deferred: list[int] | None = None) -> Iterator[tuple[Cluster, str]]:
    """The run's cluster, started, and the Redis URL its nodes dial: on this host, or with
    ``rtt_ms`` each node and Redis on a lab host of its own (``bench.netns.lab_cluster``)."""
    if setup.rtt_ms is None:
        with Cluster(num_nodes, setup.node_args(), scheduler_name=scheduler, log_dir=str(log_dir),
                     per_node_args=per_node_args, deferred=deferred or ()) as cluster:
            yield cluster, cluster.redis.url
        return
    with lab_cluster(num_nodes, setup.node_args(), setup.rtt_ms, str(log_dir), per_node_args,
                     scheduler_name=scheduler, deferred=deferred or ()) as built:
        yield built.cluster, built.redis_url


async def _drive(cluster: Cluster, mode: str, items: list[Item], setup: Setup, progress: Progress,
                 door: str | None, redis_url: str) -> tuple[list[RequestRecord], Membership]:
    """Send every item at its time: to ``door`` (nginx) when given, else to the node the
    item names (client-side round-robin); ``oracle`` places each itself."""
    task = progress.add_task(f"{mode:>10}", total=len(items))
    records = {item.index: RequestRecord(item.index, item.arrival_s, cluster.nodes[item.node].name) for item in items}
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.monotonic()
        members = Membership(cluster, items, setup, t0)

        async def one(item: Item, node_index: int, url: str | None = None) -> None:
            record = records[item.index]
            record.origin = cluster.nodes[node_index].name
            answered = members.sending(node_index)
            try:
                await _stream(session, url or cluster.nodes[node_index].url, item, record, t0, answered)
            finally:
                answered()
            progress.advance(task)

        if mode == "fastdeploy":
            await _fastdeploy(cluster, items, setup, t0, records, session, lambda: progress.advance(task), members,
                              redis_url)
        elif mode != "oracle":
            async def send(item: Item) -> None:
                await asyncio.sleep(max(0.0, t0 + item.arrival_s - time.monotonic()))
                await members.ready(item.node)
                await one(item, item.node, door)

            await asyncio.gather(members.run(), *(send(item) for item in items))
        else:
            await asyncio.gather(members.run(), _oracle(items, setup, t0, one, members))
    return [records[item.index] for item in items], members


def _node_engine(session: aiohttp.ClientSession, url: str) -> Engine:
    """A FastDeploy scheduler's engine: its node, one streamed completion per request."""
    async def run(raw: dict[str, Any]) -> AsyncIterator[Chunk]:
        body = {key: raw[key] for key in ("prompt", "max_tokens", "seed", "stream", "ignore_eos", "return_token_ids")}
        async for payload in _chunks(session, url, body):
            if "error" in payload:
                yield Chunk(0, True, str(payload["error"].get("message", "error")))
                return
            choice = payload["choices"][0]
            finished = choice.get("finish_reason") is not None
            yield Chunk(len(choice.get("token_ids") or []), finished)
            if finished:
                return
        yield Chunk(0, True, "the stream ended without a finish reason")
    return run


async def _fastdeploy(cluster: Cluster, items: list[Item], setup: Setup, t0: float,
                      records: dict[int, RequestRecord], session: aiohttp.ClientSession,
                      advance: Callable[[], None], members: Membership, redis_url: str) -> None:
    """Each item to its origin's FastDeploy scheduler; its record fills as its origin's client
    would see the results (a stolen request's after their trip through Redis). A joining node's
    scheduler starts when its node does; a leaving node's takes nothing more from Redis. The
    schedulers run here but dial Redis at ``redis_url``, as the nodes do (across the lab's
    delayed link with ``--netns-rtt-ms``)."""
    config = FdConfig(min_load_score=setup.min_load_score, max_num_seqs=setup.max_num_seqs)
    schedulers = [FdScheduler(node.name, redis_url, config, _node_engine(session, node.url),
                              random.Random(f"{setup.seed}-{i}")) for i, node in enumerate(cluster.nodes)]
    started = []
    for i, scheduler in enumerate(schedulers):
        if i != members.joiner:
            await scheduler.start()
            started.append(scheduler)
    loop = asyncio.get_running_loop()

    async def on_join(node: int) -> None:
        await schedulers[node].start()
        started.append(schedulers[node])

    async def on_leave(node: int) -> None:
        await schedulers[node].leave()

    async def send(item: Item) -> None:
        await asyncio.sleep(max(0.0, t0 + item.arrival_s - time.monotonic()))
        record = records[item.index]
        done: asyncio.Future[None] = loop.create_future()

        def sink(event: Event) -> None:
            now = time.monotonic() - t0
            if event["n"]:
                record.token_times.append(now)
                record.num_tokens += event["n"]
            if event["done"] and not done.done():
                record.served_by = event["by"]
                if event["error"]:
                    record.error = event["error"]
                else:
                    record.finish_s = now
                done.set_result(None)

        await members.ready(item.node)
        await schedulers[item.node].put_request(f"req-{item.index}", _body(item), sink)
        try:
            await asyncio.wait_for(done, 900)
        except TimeoutError:
            record.error = "no result within 900 s (lost)"
        advance()

    try:
        await asyncio.gather(members.run(on_join, on_leave, signal_leaver=False), *(send(item) for item in items))
    finally:
        for scheduler in started:
            await scheduler.close()


async def _oracle(items: list[Item], setup: Setup, t0: float, one: Any, members: Membership) -> None:
    """One queue at the client: each request, in arrival order, to the live node with the most
    free slots the moment one has any."""
    in_flight = [0] * setup.total_nodes
    tasks: list[asyncio.Task[None]] = []

    async def run(item: Item, node: int) -> None:
        try:
            await one(item, node)
        finally:
            in_flight[node] -= 1
            members.changed.set()

    for item in items:
        await asyncio.sleep(max(0.0, t0 + item.arrival_s - time.monotonic()))
        while True:
            node = min(members.live(), key=lambda n: (in_flight[n], n))
            if in_flight[node] < setup.max_num_seqs:
                break
            members.changed.clear()
            await members.changed.wait()
        in_flight[node] += 1
        tasks.append(asyncio.create_task(run(item, node)))
    await asyncio.gather(*tasks)


def _redis_counters(redis: EmbeddedRedis) -> tuple[int, float]:
    """Commands Redis has run, but for this counter's own connection (HELLO, CLIENT, INFO), and
    the CPU time it has used."""
    client = redis.admin_client(timeout=5)
    try:
        stats = client.info("commandstats")
        cpu = client.info("cpu")
    finally:
        client.close()
    own = {"cmdstat_info", "cmdstat_hello", "cmdstat_client"}
    commands = sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_") and k not in own)
    return commands, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


class Nginx:
    """Debian's nginx as the front door: a round-robin upstream of the nodes, SSE unbuffered,
    started in its own prefix folder and stopped with the mode."""

    def __init__(self, nodes: list[tuple[str, int]], folder: Path):
        folder = folder.resolve()  # nginx reads relative paths from its prefix
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        servers = "".join(f"    server {host}:{port};\n" for host, port in nodes)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tmp").mkdir(exist_ok=True)
        (folder / "nginx.conf").write_text(f"""worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {folder}/tmp;
  proxy_temp_path {folder}/tmp;
  upstream nodes {{
{servers}    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{self.port};
    location / {{
      proxy_pass http://nodes;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 900s;
    }}
  }}
}}
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Nginx:
        binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if binary is None:
            raise SystemExit("python -m bench: error: --front nginx needs nginx (apt-get install nginx-light)")
        self.proc = subprocess.Popen([binary, "-p", str(self.folder), "-c", str(self.folder / "nginx.conf"),
                                      "-e", str(self.folder / "error.log"), "-g", "daemon off;"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"python -m bench: error: nginx exited (see {self.folder / 'error.log'})")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise SystemExit("python -m bench: error: nginx did not start listening in 10 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish the streams in flight
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run_mode(mode: str, items: list[Item], setup: Setup, progress: Progress, log_dir: Path,
             front: str = "client") -> ModeRun:
    scheduler = "global" if mode == "global" else "local"
    deferred = [setup.nodes] if setup.total_nodes > setup.nodes else []
    with _cluster(setup, setup.total_nodes, scheduler, log_dir / mode, setup.per_node_args(),
                  deferred) as (cluster, redis_url):
        before, cpu_before = _redis_counters(cluster.redis)
        started = time.monotonic()
        if front == "nginx" and mode in ("local", "global"):  # the oracle and FastDeploy's schedulers place requests themselves
            with Nginx([(n.host, n.port) for n in cluster.nodes], log_dir / mode / "nginx") as nginx:
                records, members = asyncio.run(_drive(cluster, mode, items, setup, progress, nginx.url, redis_url))
        else:
            records, members = asyncio.run(_drive(cluster, mode, items, setup, progress, None, redis_url))
        wall = time.monotonic() - started
        commands, cpu = _redis_counters(cluster.redis)
        commands -= before
        cpu -= cpu_before
        node_stats = {n.name: n.stats()["stats"] for n in cluster.nodes if n.is_alive}
        joins, leaves = members.sim_changes()
    return ModeRun(mode, records, commands, cpu, wall, node_stats, joins, leaves)


def _row(summary: dict[str, Any]) -> list[str]:
    return [f"{summary['ttft']['p50']:.3f}", f"{summary['ttft']['p99']:.3f}", f"{summary['e2el']['mean']:.3f}",
            f"{summary['e2el']['p99']:.3f}", f"{summary['tpot']['mean'] * 1000:.1f}",
            f"{summary['output_throughput']:.0f}", str(summary["failed"])]


HEADER = ["TTFT p50 s", "TTFT p99 s", "E2EL mean s", "E2EL p99 s", "TPOT mean ms", "out tok/s", "failed"]


def plot(runs: list[ModeRun], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        for ax, metric in zip(axes, ("ttft", "e2el"), strict=True):
            values = sorted(v for r in run.records if (v := getattr(r, metric)) is not None)
            ax.plot(values, [i / max(1, len(values) - 1) for i in range(len(values))], label=run.mode)
    for ax, title in zip(axes, ("time to first token (s)", "end-to-end latency (s)"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    paths.append(out / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    for run in runs:
        paths.append(out / f"timeline_{run.mode}.png")
        _timeline(run, paths[-1], plt)
    return paths


def _timeline(run: ModeRun, path: Path, plt: Any) -> None:
    """Per node, over the run: sequences running there (busy slots) and requests waiting on it
    (arrived there, not started anywhere yet), sampled every 50 ms."""
    done = [r for r in run.records if r.token_times and r.finish_s is not None]
    end = max((r.finish_s or 0.0 for r in done), default=1.0)
    grid = [k * 0.05 for k in range(int(end / 0.05) + 2)]
    nodes = sorted({r.origin for r in run.records} | {r.served_by for r in done if r.served_by})
    fig, axes = plt.subplots(2, 1, figsize=(11, 5.5), sharex=True)
    for node in nodes:
        running = [0] * len(grid)
        waiting = [0] * len(grid)
        for r in done:
            first = r.token_times[0]
            lo, hi = int(first / 0.05), int((r.finish_s or first) / 0.05)
            if r.served_by == node:
                for k in range(lo, min(hi + 1, len(grid))):
                    running[k] += 1
            if r.origin == node:
                for k in range(int(r.arrival_s / 0.05), min(lo, len(grid))):
                    waiting[k] += 1
        axes[0].plot(grid, running, linewidth=0.8, label=node)
        axes[1].plot(grid, waiting, linewidth=0.8, label=node)
    axes[0].set_ylabel("running (slots busy)")
    axes[1].set_ylabel("waiting, by origin")
    axes[1].set_xlabel(f"{run.mode}: seconds into the run")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=7, ncol=min(8, len(nodes)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--decode-step-ms", type=float, default=20.0)
    p.add_argument("--load", type=float, default=0.9, help="arrival rate as a fraction of the cluster's capacity")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--arrival", choices=["poisson", "gamma", "steady"], default="poisson")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--min-load-score", type=int, default=1)
    p.add_argument("--target", choices=["round_robin", "one_node"], default="round_robin",
                   help="where the front door sends requests (one_node: all to node 0)")
    p.add_argument("--slow-factor", type=float, default=1.0, help="node 0's steps take this many times longer")
    p.add_argument("--long-prompt-fraction", type=float, default=0.0, help="share of 1-2k-token prompts")
    p.add_argument("--prefill-ms-per-token", type=float, default=0.0, help="step time added per prompt token prefilled")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--front", choices=["client", "nginx"], default="client",
                   help="round-robin in the client, or through a real nginx (Debian's package) as deployed")
    p.add_argument("--engine", choices=ENGINES, default="sim",
                   help="sim: the cost model (a step sleeps); tiny: the real tiny model on CPU, steps paced to "
                        "--decode-step-ms (the nodes share this machine's cores)")
    p.add_argument("--join-at", type=float, default=None, metavar="FRACTION",
                   help="one more node joins when this fraction of the requests has arrived")
    p.add_argument("--leave-at", type=float, default=None, metavar="FRACTION",
                   help="node 1 leaves (SIGTERM: it drains) when this fraction of the requests has arrived")
    p.add_argument("--capacity-rps", type=float, default=None,
                   help="the cluster's capacity in requests/s (default: measured before the run)")
    p.add_argument("--netns-rtt-ms", type=float, default=None, metavar="MS",
                   help="put each node and Redis on a host of its own (network namespaces; needs root) with this "
                        "round trip between hosts, from a TCP proxy (default: every process on this host)")
    p.add_argument("--out", default="out/bench")
    args = p.parse_args(argv)
    problems = []
    if args.netns_rtt_ms is not None:
        why_not = unavailable()
        if args.netns_rtt_ms < 0 or why_not:
            problems.append(f"--netns-rtt-ms needs a round trip >= 0 ms and network namespaces ({why_not or 'ok'})")
    if args.nodes < 1 or args.requests < 1 or args.max_num_seqs < 1:
        problems.append("--nodes, --requests and --max-num-seqs must be >= 1")
    if not 0 < args.load <= 2 or args.slow_factor <= 0 or args.decode_step_ms <= 0 or args.prefill_ms_per_token < 0:
        problems.append("need 0 < --load <= 2, --slow-factor > 0, --decode-step-ms > 0, --prefill-ms-per-token >= 0")
    if not 0 <= args.long_prompt_fraction <= 1:
        problems.append("--long-prompt-fraction must be in [0, 1]")
    for flag, value in (("--join-at", args.join_at), ("--leave-at", args.leave_at)):
        if value is not None and not 0 < value < 1:
            problems.append(f"{flag} is a fraction of the requests, in (0, 1)")
    if args.leave_at is not None and (args.nodes < 2 or args.target == "one_node"):
        problems.append("--leave-at needs --nodes >= 2 and round-robin traffic (node 1 leaves)")
    if args.front == "nginx" and (args.join_at is not None or args.leave_at is not None):
        problems.append("--join-at/--leave-at need --front client (the nginx upstream is fixed)")
    if args.engine == "tiny" and (args.long_prompt_fraction > 0 or args.prefill_ms_per_token > 0):
        problems.append("--engine tiny: the tiny model's context (2,048) has no room for long prompts, and its "
                        "prefill costs what it costs (--prefill-ms-per-token is the sim engine's)")
    if args.capacity_rps is not None and args.capacity_rps <= 0:
        problems.append("--capacity-rps must be > 0")
    if problems:
        print(f"{p.prog}: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    setup = Setup(args.nodes, args.max_num_seqs, args.decode_step_ms, args.load, args.requests, args.arrival,
                  args.seed, args.min_load_score, args.target, args.slow_factor, args.long_prompt_fraction,
                  args.prefill_ms_per_token, args.engine, args.join_at, args.leave_at, args.capacity_rps,
                  args.netns_rtt_ms)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    runs: list[ModeRun] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        step_ms: list[float] | None = None
        if setup.capacity_rps is not None:
            capacity, measured = setup.capacity_rps, "given"
        else:
            capacity, step_ms = measure_capacity(setup, out / "logs", progress)
            measured = "measured: steps " + ", ".join(f"{ms:.1f}" for ms in step_ms) + " ms at full batch"
        work, items = setup.workload(capacity)
        changes = "".join([f"; node{setup.nodes} joins at request {work.join_at}" if work.join_at else "",
                           f"; node{work.leaver} leaves at request {work.leave_at}" if work.leave_at else ""])
        console.print(f"{args.nodes} {args.engine} nodes x {args.max_num_seqs} slots, {args.decode_step_ms:g} ms "
                      f"steps; {args.requests} requests, {args.arrival} at {args.load:.0%} of {capacity:.2f} req/s "
                      f"({measured}); outputs {work.output_scale:g} x Pareto({work.output_alpha:g}) capped at "
                      f"{work.output_cap}{changes}")
        for mode in args.modes:
            runs.append(run_mode(mode, items, setup, progress, out / "logs", args.front))
    spec = setup.cluster_spec()
    table = Table(title=f"balance bench: real node processes ({setup.engine} engine), and the simulator on the same items")
    extra = ["stolen", "waits with a free slot", "free-slot wait mean ms", "Redis cmd/s/node", "Redis cmd/req",
             "Redis cmd/1k tok", "Redis CPU %"]
    for column in ["mode", "run", *HEADER, *extra]:
        table.add_column(column, justify="right")
    results: dict[str, Any] = {"setup": dataclasses.asdict(setup), "capacity_rps": capacity,
                               "capacity_step_ms": step_ms, "modes": {}}
    lines = ["| mode | run | " + " | ".join(HEADER + extra) + " |", "|" + "---|" * (len(HEADER) + len(extra) + 2)]
    for run in runs:
        real = summarize(run.records)
        # The twin runs at the step time the real nodes showed (their per-step overhead, a few
        # percent, matters near saturation): what remains between the two is the scheduling.
        # (with a slow node 0, the others' steps: the twin slows node 0 by the factor itself)
        base = [t for r in run.records if (t := r.tpot) is not None and (setup.slow_factor == 1 or r.served_by != "node0")]
        run_step_ms = 1000 * sum(base) / len(base) if base else setup.decode_step_ms
        twin = dataclasses.replace(spec, cost=dataclasses.replace(spec.cost, decode_step_ms=run_step_ms),
                                   joins=run.joins, leaves=run.leaves)
        simulated = simulate(twin, run.mode, items)  # type: ignore[arg-type]
        rows = [("real", real, run.redis_commands, run.wall_s, f"{100 * run.redis_cpu_s / max(run.wall_s, 1e-9):.1f}",
                 run.records),
                ("sim", simulated.summary, simulated.counters.redis_commands, simulated.summary["sim_time_s"], "",
                 simulated.records)]
        tokens = sum(r.num_tokens for r in run.records if r.ok)
        live = {f"node{n}": (t, math.inf) for n, t in run.joins} | {f"node{n}": (-math.inf, t) for n, t in run.leaves}
        for label, summary, commands, seconds, cpu, records in rows:
            # per node and second a node was up: a joiner counts from its join, a leaver until it left
            node_s = setup.nodes * seconds + sum(max(0.0, seconds - t) for _, t in run.joins) \
                - sum(max(0.0, seconds - t) for _, t in run.leaves)
            stolen = summary["served_elsewhere"] if run.mode in ("global", "fastdeploy") else 0  # oracle: the client placed them
            idle = idle_slot_waits(records, setup.max_num_seqs, run_step_ms / 1000, live)
            cells = [run.mode, label, *_row(summary), str(stolen),
                     str(sum(1 for wait in idle.values() if wait > run_step_ms / 1000)),
                     f"{1000 * sum(idle.values()) / max(1, len(idle)):.1f}",
                     f"{commands / max(node_s, 1e-9):.1f}",
                     f"{commands / max(1, summary['completed']):.1f}", f"{commands / max(1, tokens) * 1000:.0f}", cpu]
            table.add_row(*cells)
            lines.append("| " + " | ".join(cells) + " |")
        results["modes"][run.mode] = {"real": real, "sim": simulated.summary,
                                      "redis_commands": run.redis_commands, "redis_cpu_s": run.redis_cpu_s,
                                      "wall_s": run.wall_s, "joins": run.joins, "leaves": run.leaves,
                                      "node_stats": run.node_stats,
                                      "records": [dataclasses.asdict(r) for r in run.records]}
    Console(width=200).print(table)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "report.md").write_text(f"# Balance bench\n\n`{command}`\n\n" + "\n".join(lines) + "\n")
    paths = plot(runs, out)
    console.print(f"written: {out / 'results.json'}, {out / 'report.md'}, " + ", ".join(str(p) for p in paths))
    return 0

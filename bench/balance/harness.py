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

The same items also run through the simulator (``simulate.py``) with the same cluster and the
step time the real nodes showed (their mean time per output token), so each real number has
its simulated twin beside it (the simulator's large-cluster numbers are only as good as that
agreement). Redis commands are counted from ``INFO commandstats`` over each
mode's run. Written under ``--out``: ``results.json`` (every record), ``report.md`` (the
table), ``latency_cdf.png`` and ``timeline_<mode>.png``.

The nodes share this machine's cores: with the sim engine a step costs sleep, not CPU, so
the balance is the scheduler's; with ``--engine real`` they compete for the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import redis as redis_lib
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from p2psched.cluster import Cluster
from p2psched.redis_server import free_port

from .fastdeploy import Chunk, Engine, Event, FdConfig, FdScheduler
from .metrics import RequestRecord, summarize
from .simulate import ClusterSpec, simulate
from .workload import Item, WorkloadSpec, generate, sim_capacity_rps

MODES = ("local", "global", "fastdeploy", "oracle")


@dataclasses.dataclass(frozen=True)
class Setup:
    nodes: int = 4
    max_num_seqs: int = 8
    decode_step_ms: float = 20.0
    load: float = 0.9
    num_requests: int = 300
    arrival: str = "poisson"
    seed: int = 1
    min_load_score: int = 1
    target: str = "round_robin"  # or "one_node": every request to node 0
    slow_factor: float = 1.0  # node 0's steps take this many times longer (heterogeneous nodes)
    long_prompt_fraction: float = 0.0  # this share of prompts is 1-2k tokens
    prefill_ms_per_token: float = 0.0  # a step lengthens by this per prompt token it prefills

    def per_node_args(self) -> list[list[str]]:
        slow = ["--sim-decode-step-ms", str(self.decode_step_ms * self.slow_factor)] if self.slow_factor != 1 else []
        return [slow] + [[] for _ in range(self.nodes - 1)]

    def node_args(self) -> list[str]:
        return ["--engine", "sim", "--max-num-seqs", str(self.max_num_seqs),
                "--sim-decode-step-ms", str(self.decode_step_ms), "--sim-decode-ms-per-seq", "0",
                "--sim-decode-ms-per-kilotoken", "0", "--sim-prefill-ms-per-token", str(self.prefill_ms_per_token),
                "--scheduler-min-load-score", str(self.min_load_score)]

    def cluster_spec(self) -> ClusterSpec:
        base = ClusterSpec()
        return ClusterSpec(nodes=self.nodes, max_num_seqs=self.max_num_seqs,
                           cost=dataclasses.replace(base.cost, decode_step_ms=self.decode_step_ms,
                                                    prefill_ms_per_token=self.prefill_ms_per_token),
                           slowdowns=(self.slow_factor,), min_load_score=self.min_load_score, seed=self.seed)

    def workload(self) -> tuple[WorkloadSpec, list[Item], float]:
        spec = WorkloadSpec(num_requests=self.num_requests, arrival=self.arrival, seed=self.seed,  # type: ignore[arg-type]
                            target=self.target, long_prompt_fraction=self.long_prompt_fraction)  # type: ignore[arg-type]
        capacity = sim_capacity_rps(self.cluster_spec().cost, self.max_num_seqs, spec, self.nodes, (self.slow_factor,))
        return spec, generate(spec.at_rate(self.load * capacity), self.nodes), capacity


@dataclasses.dataclass
class ModeRun:
    mode: str
    records: list[RequestRecord]
    redis_commands: int
    redis_cpu_s: float  # the Redis server's CPU time (user + system) over the run
    wall_s: float
    node_stats: dict[str, dict[str, Any]]


def _prompt(item: Item) -> str:
    """``item.prompt_tokens`` bytes (the sim tokenizer is byte-level), distinct per request."""
    head = f"req {item.index} "
    return head + "x" * max(0, item.prompt_tokens - len(head))


def _body(item: Item) -> dict[str, Any]:
    return {"prompt": _prompt(item), "max_tokens": item.max_tokens, "seed": item.seed, "stream": True,
            "ignore_eos": True, "return_token_ids": True}


async def _chunks(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The streamed completion's chunks (decoded); an error chunk for a refused request."""
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            yield {"error": {"message": f"HTTP {resp.status}"}}
            return
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


async def _stream(session: aiohttp.ClientSession, url: str, item: Item, record: RequestRecord, t0: float) -> None:
    try:
        async for payload in _chunks(session, url, _body(item)):
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


async def _drive(cluster: Cluster, mode: str, items: list[Item], setup: Setup, progress: Progress,
                 door: str | None) -> list[RequestRecord]:
    """Send every item at its time: to ``door`` (nginx) when given, else to the node the
    item names (client-side round-robin); ``oracle`` places each itself."""
    task = progress.add_task(f"{mode:>7}", total=len(items))
    records = {item.index: RequestRecord(item.index, item.arrival_s, cluster.nodes[item.node].name) for item in items}
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.monotonic()

        async def one(item: Item, node_index: int, url: str | None = None) -> None:
            record = records[item.index]
            record.origin = cluster.nodes[node_index].name
            await _stream(session, url or cluster.nodes[node_index].url, item, record, t0)
            progress.advance(task)

        if mode == "fastdeploy":
            await _fastdeploy(cluster, items, setup, t0, records, session, lambda: progress.advance(task))
        elif mode != "oracle":
            async def send(item: Item) -> None:
                await asyncio.sleep(max(0.0, t0 + item.arrival_s - time.monotonic()))
                await one(item, item.node, door)

            await asyncio.gather(*(send(item) for item in items))
        else:
            await _oracle(items, setup, t0, one)
    return [records[item.index] for item in items]


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
                      advance: Callable[[], None]) -> None:
    """Each item to its origin's FastDeploy scheduler; its record fills as its origin's client
    would see the results (a stolen request's after their trip through Redis)."""
    config = FdConfig(min_load_score=setup.min_load_score, max_num_seqs=setup.max_num_seqs)
    schedulers = [FdScheduler(node.name, cluster.redis.url, config, _node_engine(session, node.url),
                              random.Random(f"{setup.seed}-{i}")) for i, node in enumerate(cluster.nodes)]
    for scheduler in schedulers:
        await scheduler.start()
    loop = asyncio.get_running_loop()

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

        await schedulers[item.node].put_request(f"req-{item.index}", _body(item), sink)
        try:
            await asyncio.wait_for(done, 900)
        except TimeoutError:
            record.error = "no result within 900 s (lost)"
        advance()

    try:
        await asyncio.gather(*(send(item) for item in items))
    finally:
        for scheduler in schedulers:
            await scheduler.close()


async def _oracle(items: list[Item], setup: Setup, t0: float, one: Any) -> None:
    """One queue at the client: each request, in arrival order, to the node with the most free
    slots the moment one has any."""
    in_flight = [0] * setup.nodes
    freed = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def run(item: Item, node: int) -> None:
        try:
            await one(item, node)
        finally:
            in_flight[node] -= 1
            freed.set()

    for item in items:
        await asyncio.sleep(max(0.0, t0 + item.arrival_s - time.monotonic()))
        while True:
            node = min(range(setup.nodes), key=lambda n: (in_flight[n], n))
            if in_flight[node] < setup.max_num_seqs:
                break
            freed.clear()
            await freed.wait()
        in_flight[node] += 1
        tasks.append(asyncio.create_task(run(item, node)))
    await asyncio.gather(*tasks)


def _redis_counters(port: int) -> tuple[int, float]:
    """Commands Redis has run, but for this counter's own connection (HELLO, CLIENT, INFO), and
    the CPU time it has used."""
    client = redis_lib.Redis(port=port)
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

    def __init__(self, node_ports: list[int], folder: Path):
        folder = folder.resolve()  # nginx reads relative paths from its prefix
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        servers = "".join(f"    server 127.0.0.1:{port};\n" for port in node_ports)
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
    with Cluster(setup.nodes, setup.node_args(), scheduler_name=scheduler, log_dir=str(log_dir / mode),
                 per_node_args=setup.per_node_args()) as cluster:
        before, cpu_before = _redis_counters(cluster.redis.port)
        started = time.monotonic()
        if front == "nginx" and mode in ("local", "global"):  # the oracle and FastDeploy's schedulers place requests themselves
            with Nginx([n.port for n in cluster.nodes], log_dir / mode / "nginx") as nginx:
                records = asyncio.run(_drive(cluster, mode, items, setup, progress, nginx.url))
        else:
            records = asyncio.run(_drive(cluster, mode, items, setup, progress, None))
        wall = time.monotonic() - started
        commands, cpu = _redis_counters(cluster.redis.port)
        commands -= before
        cpu -= cpu_before
        node_stats = {n.name: n.stats()["stats"] for n in cluster.nodes}
    return ModeRun(mode, records, commands, cpu, wall, node_stats)


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
    p.add_argument("--out", default="out/bench")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.requests < 1 or not 0 < args.load <= 2 or args.slow_factor <= 0 \
            or not 0 <= args.long_prompt_fraction <= 1 or args.max_num_seqs < 1 or args.decode_step_ms <= 0 \
            or args.prefill_ms_per_token < 0:
        print(f"{p.prog}: error: need --nodes >= 1, --requests >= 1, 0 < --load <= 2, --slow-factor > 0, "
              "--long-prompt-fraction in [0, 1], --max-num-seqs >= 1, --decode-step-ms > 0", file=sys.stderr)
        return 2
    setup = Setup(args.nodes, args.max_num_seqs, args.decode_step_ms, args.load, args.requests, args.arrival,
                  args.seed, args.min_load_score, args.target, args.slow_factor, args.long_prompt_fraction,
                  args.prefill_ms_per_token)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work, items, capacity = setup.workload()
    console = Console(stderr=True)
    console.print(f"{args.nodes} sim nodes x {args.max_num_seqs} slots, {args.decode_step_ms:g} ms steps; "
                  f"{args.requests} requests, {args.arrival} at {args.load:.0%} of {capacity:.1f} req/s; "
                  f"outputs {work.output_scale:g} x Pareto({work.output_alpha:g}) capped at {work.output_cap}")
    runs: list[ModeRun] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        for mode in args.modes:
            runs.append(run_mode(mode, items, setup, progress, out / "logs", args.front))
    spec = setup.cluster_spec()
    table = Table(title="balance bench: real node processes (sim engine), and the simulator on the same items")
    extra = ["stolen", "Redis cmd/s/node", "Redis cmd/req", "Redis cmd/1k tok", "Redis CPU %"]
    for column in ["mode", "run", *HEADER, *extra]:
        table.add_column(column, justify="right")
    results: dict[str, Any] = {"setup": dataclasses.asdict(setup), "capacity_rps": capacity, "modes": {}}
    lines = ["| mode | run | " + " | ".join(HEADER + extra) + " |", "|" + "---|" * (len(HEADER) + len(extra) + 2)]
    for run in runs:
        real = summarize(run.records)
        # The twin runs at the step time the real nodes showed (their per-step overhead, a few
        # percent, matters near saturation): what remains between the two is the scheduling.
        step_ms = real["tpot"]["mean"] * 1000
        twin = dataclasses.replace(spec, cost=dataclasses.replace(spec.cost, decode_step_ms=step_ms))
        simulated = simulate(twin, run.mode, items)  # type: ignore[arg-type]
        rows = [("real", real, run.redis_commands, run.wall_s, f"{100 * run.redis_cpu_s / max(run.wall_s, 1e-9):.1f}"),
                ("sim", simulated.summary, simulated.counters.redis_commands, simulated.summary["sim_time_s"], "")]
        tokens = sum(r.num_tokens for r in run.records if r.ok)
        for label, summary, commands, seconds, cpu in rows:
            stolen = summary["served_elsewhere"] if run.mode in ("global", "fastdeploy") else 0  # oracle: the client placed them
            cells = [run.mode, label, *_row(summary), str(stolen),
                     f"{commands / max(seconds, 1e-9) / setup.nodes:.1f}",
                     f"{commands / max(1, summary['completed']):.1f}", f"{commands / max(1, tokens) * 1000:.0f}", cpu]
            table.add_row(*cells)
            lines.append("| " + " | ".join(cells) + " |")
        results["modes"][run.mode] = {"real": real, "sim": simulated.summary,
                                      "redis_commands": run.redis_commands, "redis_cpu_s": run.redis_cpu_s,
                                      "wall_s": run.wall_s,
                                      "node_stats": run.node_stats,
                                      "records": [dataclasses.asdict(r) for r in run.records]}
    Console(width=200).print(table)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "report.md").write_text(f"# Balance bench\n\n`{command}`\n\n" + "\n".join(lines) + "\n")
    paths = plot(runs, out)
    console.print(f"written: {out / 'results.json'}, {out / 'report.md'}, " + ", ".join(str(p) for p in paths))
    return 0

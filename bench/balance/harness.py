"""The balance bench on real processes: one workload, several schedulers, side by side.

``python -m bench`` (``make bench``) starts an embedded Redis and N node processes for each mode
in turn, sends the same seeded workload (``workload.py``) with every response streamed, and
records, per request, what its client saw (``metrics.RequestRecord``). Modes:

- ``local``: no stealing; the front door's round-robin decides where each request runs.
- ``global``: p2psched's stealing.
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
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import redis as redis_lib
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from p2psched.cluster import Cluster

from .metrics import RequestRecord, summarize
from .simulate import ClusterSpec, simulate
from .workload import Item, WorkloadSpec, generate, sim_capacity_rps

MODES = ("local", "global", "oracle")


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

    def node_args(self) -> list[str]:
        return ["--engine", "sim", "--max-num-seqs", str(self.max_num_seqs),
                "--sim-decode-step-ms", str(self.decode_step_ms), "--sim-decode-ms-per-seq", "0",
                "--sim-decode-ms-per-kilotoken", "0", "--sim-prefill-ms-per-token", "0",
                "--scheduler-min-load-score", str(self.min_load_score)]

    def cluster_spec(self) -> ClusterSpec:
        base = ClusterSpec()
        return ClusterSpec(nodes=self.nodes, max_num_seqs=self.max_num_seqs,
                           cost=dataclasses.replace(base.cost, decode_step_ms=self.decode_step_ms),
                           min_load_score=self.min_load_score, seed=self.seed)

    def workload(self) -> tuple[WorkloadSpec, list[Item], float]:
        spec = WorkloadSpec(num_requests=self.num_requests, arrival=self.arrival, seed=self.seed)  # type: ignore[arg-type]
        capacity = sim_capacity_rps(self.cluster_spec().cost, self.max_num_seqs, spec, self.nodes)
        return spec, generate(spec.at_rate(self.load * capacity), self.nodes), capacity


@dataclasses.dataclass
class ModeRun:
    mode: str
    records: list[RequestRecord]
    redis_commands: int
    wall_s: float
    node_stats: dict[str, dict[str, Any]]


def _prompt(item: Item) -> str:
    """``item.prompt_tokens`` bytes (the sim tokenizer is byte-level), distinct per request."""
    head = f"req {item.index} "
    return head + "x" * max(0, item.prompt_tokens - len(head))


async def _stream(session: aiohttp.ClientSession, url: str, item: Item, record: RequestRecord, t0: float) -> None:
    body = {"prompt": _prompt(item), "max_tokens": item.max_tokens, "seed": item.seed, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                record.error = f"HTTP {resp.status}"
                return
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                if "error" in payload:
                    record.error = str(payload["error"].get("message", "error"))
                    return
                ids = payload["choices"][0].get("token_ids") or []
                if ids:
                    record.token_times.append(time.monotonic() - t0)
                    record.num_tokens += len(ids)
                if "p2psched" in payload:
                    record.served_by = payload["p2psched"].get("served_by", "")
        record.finish_s = time.monotonic() - t0
    except (aiohttp.ClientError, TimeoutError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"


async def _drive(cluster: Cluster, mode: str, items: list[Item], setup: Setup, progress: Progress) -> list[RequestRecord]:
    task = progress.add_task(f"{mode:>7}", total=len(items))
    records = {item.index: RequestRecord(item.index, item.arrival_s, cluster.nodes[item.node].name) for item in items}
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.monotonic()

        async def one(item: Item, node_index: int) -> None:
            record = records[item.index]
            record.origin = cluster.nodes[node_index].name
            await _stream(session, cluster.nodes[node_index].url, item, record, t0)
            progress.advance(task)

        if mode != "oracle":
            async def send(item: Item) -> None:
                await asyncio.sleep(max(0.0, t0 + item.arrival_s - time.monotonic()))
                await one(item, item.node)

            await asyncio.gather(*(send(item) for item in items))
        else:
            await _oracle(items, setup, t0, one)
    return [records[item.index] for item in items]


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


def _redis_commands(port: int) -> int:
    stats = redis_lib.Redis(port=port).info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_") and k != "cmdstat_info")


def run_mode(mode: str, items: list[Item], setup: Setup, progress: Progress, log_dir: Path) -> ModeRun:
    scheduler = "global" if mode == "global" else "local"
    with Cluster(setup.nodes, setup.node_args(), scheduler_name=scheduler, log_dir=str(log_dir / mode)) as cluster:
        before = _redis_commands(cluster.redis.port)
        started = time.monotonic()
        records = asyncio.run(_drive(cluster, mode, items, setup, progress))
        wall = time.monotonic() - started
        commands = _redis_commands(cluster.redis.port) - before
        node_stats = {n.name: n.stats()["stats"] for n in cluster.nodes}
    return ModeRun(mode, records, commands, wall, node_stats)


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
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--out", default="out/bench")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.requests < 1 or not 0 < args.load <= 2:
        print(f"{p.prog}: error: need --nodes >= 1, --requests >= 1, 0 < --load <= 2", file=sys.stderr)
        return 2
    setup = Setup(args.nodes, args.max_num_seqs, args.decode_step_ms, args.load, args.requests, args.arrival,
                  args.seed, args.min_load_score)
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
            runs.append(run_mode(mode, items, setup, progress, out / "logs"))
    spec = setup.cluster_spec()
    table = Table(title="balance bench: real node processes (sim engine), and the simulator on the same items")
    for column in ["mode", "run", *HEADER, "stolen", "Redis cmd/s/node"]:
        table.add_column(column, justify="right")
    results: dict[str, Any] = {"setup": dataclasses.asdict(setup), "capacity_rps": capacity, "modes": {}}
    lines = ["| mode | run | " + " | ".join(HEADER) + " | stolen | Redis cmd/s/node |",
             "|" + "---|" * (len(HEADER) + 4)]
    for run in runs:
        real = summarize(run.records)
        # The twin runs at the step time the real nodes showed (their per-step overhead, a few
        # percent, matters near saturation): what remains between the two is the scheduling.
        step_ms = real["tpot"]["mean"] * 1000
        twin = dataclasses.replace(spec, cost=dataclasses.replace(spec.cost, decode_step_ms=step_ms))
        simulated = simulate(twin, run.mode, items)  # type: ignore[arg-type]
        redis_rate = run.redis_commands / max(run.wall_s, 1e-9) / setup.nodes
        for label, summary, rate in (("real", real, redis_rate),
                                     ("sim", simulated.summary, simulated.summary["redis_commands_per_s_per_node"])):
            stolen = summary["served_elsewhere"] if run.mode == "global" else 0  # oracle: the client placed them
            cells = [run.mode, label, *_row(summary), str(stolen), f"{rate:.1f}"]
            table.add_row(*cells)
            lines.append("| " + " | ".join(cells) + " |")
        results["modes"][run.mode] = {"real": real, "sim": simulated.summary, "redis_commands": run.redis_commands,
                                      "wall_s": run.wall_s, "node_stats": run.node_stats,
                                      "records": [dataclasses.asdict(r) for r in run.records]}
    Console(width=200).print(table)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "report.md").write_text(f"# Balance bench\n\n`{command}`\n\n" + "\n".join(lines) + "\n")
    paths = plot(runs, out)
    console.print(f"written: {out / 'results.json'}, {out / 'report.md'}, " + ", ".join(str(p) for p in paths))
    return 0

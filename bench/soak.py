"""``python -m bench.soak --minutes 30``: steady load on a local cluster, watched for leaks.

    python -m bench.soak --minutes 30 [--nodes 3] [--engine sim|real] [--rate R] [--out DIR] [--seed S]

Starts an embedded Redis and N real node processes (``--scheduler-name global``; by default the
simulated engine with a 5 ms decode step), then holds an open-loop, seeded load on them
(``bench/soak_load.py``): Poisson arrivals well below the cluster's capacity, streamed and
non-streamed completions and chats, varied prompt and output lengths, clients that hang up
mid-stream, and most traffic to node 0 so that its peers steal all the time.

Every few seconds it samples each node's RSS and open fds (``/proc``, the node's process tree),
its gauges (``/metrics``) and counters (``/stats``), and Redis's RSS and fds. When the load
stops it waits for the cluster to quiesce, then prints a table, writes ``soak.json`` (every
series) and ``soak.png`` (RSS, fds and completed requests/s over time), and judges
(``bench/soak_report.py``): RSS and fds must not grow from the first quarter of the run (after
a warm-up) to the last, every gauge must be back to 0, every request completed or (for the
clients that hung up) cancelled, no errors. Exit code 1 when any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from p2psched.cluster import Cluster

from .soak_load import ClientTally, LoadResult, LoadShape, drive
from .soak_probe import COUNTERS, GAUGES, Series, sample_process, scrape
from .soak_report import (
    Check,
    Limits,
    checks_table,
    client_checks,
    growth_checks,
    log_checks,
    node_end_checks,
    plot,
    render_table,
    shutdown_notes,
)

COMMON_ARGS = ["--scheduler-min-load-score", "2", "--heartbeat-interval", "0.5", "--log-level", "warning"]
ENGINE_ARGS = {
    # A cost model of an accelerator step: 5 ms plus 1 ms per sequence, 4 sequences per node.
    "sim": ["--engine", "sim", "--max-num-seqs", "4", "--sim-decode-step-ms", "5", "--sim-decode-ms-per-seq", "1"],
    # The real tiny model on CPU, one thread per node, steps paced to 20 ms (as bench/seed_scenario.py),
    # 2 sequences per node so that node 0 queues at a rate two shared cores can carry.
    "real": ["--engine", "real", "--model", "tiny", "--cpu-threads", "1", "--max-num-seqs", "2",
             "--min-step-ms", "20"],
}
# Well below capacity: node 0 alone gets about as much as it can run (so it queues and its
# peers steal all the time), the cluster as a whole runs at roughly 40% of what it could.
SHAPES = {
    "sim": LoadShape(rate=7.0),
    # the tiny model's context is 2,048 tokens (byte-level: one per character)
    "real": LoadShape(rate=2.0, prompt_max_chars=1000, output_median_tokens=40, output_max_tokens=300),
}
QUIESCE_TIMEOUT_S = 60.0


class NodeExited(Exception):
    """A node process died during the soak."""


@dataclass
class SoakResult:
    ok: bool
    checks: list[Check]
    load: LoadResult
    series: dict[str, Series]
    json_path: Path
    png_path: Path
    log_dir: Path
    node_counters: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class _Probe:
    """The sampler's state: one series per process, the latest gauges and counters per node."""

    cluster: Cluster
    redis_pid: int
    start: float
    series: dict[str, Series]
    gauges: dict[str, dict[str, float]] = field(default_factory=dict)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    scrape_errors: int = 0

    async def sample(self, session: aiohttp.ClientSession) -> None:
        t = time.monotonic() - self.start
        for node in self.cluster.nodes:
            assert node.proc is not None
            proc = sample_process(node.proc.pid)
            if proc is None or node.proc.poll() is not None:
                raise NodeExited(f"{node.name} exited with {node.proc.poll()}:\n{node.log_text()[-3000:]}")
            try:
                gauges, counters = await scrape(session, node.url)
            except (TimeoutError, aiohttp.ClientError, ValueError, KeyError):
                self.scrape_errors += 1
                gauges, counters = {}, self.counters.get(node.name, {name: 0 for name in COUNTERS})
            self.gauges[node.name], self.counters[node.name] = gauges, counters
            self.series[node.name].add(t, proc, gauges, counters)
        redis_proc = sample_process(self.redis_pid)
        if redis_proc is None:
            raise NodeExited("redis-server exited")
        self.series["redis"].add(t, redis_proc)

    def is_quiet(self, load: LoadResult, fds_before: dict[str, int], limits: Limits) -> bool:
        """Nothing held anywhere, every accepted request answered, client connections closed."""
        for node in self.cluster.nodes:
            gauges, c = self.gauges.get(node.name, {}), self.counters.get(node.name)
            if c is None or set(gauges) != set(GAUGES) or any(v != 0 for v in gauges.values()):
                return False
            if c["received"] != c["completed"] + c["cancelled"] + c["failed"]:
                return False
            if self.series[node.name].num_fds[-1] - fds_before[node.name] > limits.max_fd_leftover:
                return False
        return load.in_flight == 0


def _progress_info(probe: _Probe, load: LoadResult, hot: str) -> str:
    tallies = load.tallies.values()
    s = probe.series[hot]
    return (f"sent {sum(t.sent for t in tallies)}  done {sum(t.completed for t in tallies)}  "
            f"hung up {sum(t.hung_up for t in tallies)}  errors {sum(t.errors for t in tallies)}  "
            f"in flight {load.in_flight}  stolen {sum(c['stolen_in'] for c in probe.counters.values())}  "
            f"{hot} {s.rss_kib[-1] / 1024:.0f} MiB {s.num_fds[-1]} fds")


def _redis_pid(cluster: Cluster) -> int:
    client = redis.Redis(host=cluster.redis.host, port=cluster.redis.port)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


async def _soak(cluster: Cluster, shape: LoadShape, duration_s: float, sample_s: float, seed: int, engine: str,
                limits: Limits, console: Console) -> tuple[_Probe, LoadResult, dict[str, int], list[str]]:
    names = [n.name for n in cluster.nodes]
    probe = _Probe(cluster, _redis_pid(cluster), time.monotonic(), {name: Series() for name in [*names, "redis"]})
    load = LoadResult({name: ClientTally() for name in names})
    problems: list[str] = []
    # One keep-alive connection per node for the probe, open from the first sample to the last.
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit_per_host=1)) as session:
        for node in cluster.nodes:  # open the probe's connections before the baseline counts fds
            await scrape(session, node.url)
        await probe.sample(session)  # before the load: the baseline for "after quiesce"
        fds_before = {name: probe.series[name].num_fds[-1] for name in names}
        probe.start = time.monotonic()
        is_load_done = asyncio.Event()
        columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(f"soak {duration_s / 60:g} min", total=duration_s, info="")

            async def sampler() -> None:
                """Sample every ``sample_s`` under load; then, faster, until the cluster is quiet."""
                next_at = time.monotonic()
                quiesce_deadline = float("inf")
                while True:
                    await probe.sample(session)
                    progress.update(task, completed=min(time.monotonic() - probe.start, duration_s),
                                    info=_progress_info(probe, load, names[0]))
                    if is_load_done.is_set():
                        if probe.is_quiet(load, fds_before, limits):
                            return
                        if time.monotonic() > quiesce_deadline:
                            problems.append(f"did not quiesce within {QUIESCE_TIMEOUT_S:g}s")
                            return
                        await asyncio.sleep(0.2)  # polling /metrics: the nodes push nothing to wait on
                        continue
                    next_at += sample_s
                    with contextlib.suppress(TimeoutError):  # the sampling period, cut short when the load ends
                        await asyncio.wait_for(is_load_done.wait(), max(0.0, next_at - time.monotonic()))
                    if is_load_done.is_set():
                        quiesce_deadline = time.monotonic() + QUIESCE_TIMEOUT_S

            async def loader() -> None:
                await drive([n.url for n in cluster.nodes], shape, duration_s, seed, engine, load)
                progress.update(task, description="quiesce")
                is_load_done.set()  # every client has finished and the client session is closed

            is_crashed = False
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(sampler(), name="sampler")
                    group.create_task(loader(), name="loader")
            except* NodeExited as crashed:  # stop the load, keep what was measured, and report
                problems.append(str(crashed.exceptions[0]))
                is_crashed = True
        if not is_crashed:
            await probe.sample(session)  # after quiesce: what is judged
    if probe.scrape_errors:
        problems.append(f"{probe.scrape_errors} scrapes of /metrics or /stats failed")  # a node too slow to answer
    return probe, load, fds_before, problems


def run(minutes: float, nodes: int = 3, engine: str = "sim", rate: float | None = None, out: str | Path = "out/soak",
        seed: int = 1, sample_s: float | None = None, warmup_s: float | None = None,
        limits: Limits | None = None, console: Console | None = None) -> SoakResult:
    """The whole soak; the test suite calls this with ``minutes=1``."""
    console = console or Console(width=max(120, Console().width))
    duration_s = minutes * 60
    sample_s = sample_s or max(1.0, min(5.0, duration_s / 120))
    warmup_s = warmup_s if warmup_s is not None else max(10.0, duration_s / 10)
    limits = limits or Limits(warmup_s=warmup_s)
    shape = SHAPES[engine] if rate is None else dataclasses.replace(SHAPES[engine], rate=rate)
    out_dir = Path(out)
    log_dir = out_dir / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)  # node logs are appended to; start them afresh
    node_args = ENGINE_ARGS[engine] + COMMON_ARGS
    console.print(f"[bold]soak[/]: {nodes} nodes ({engine} engine), {duration_s / 60:g} min at {shape.rate:g} req/s "
                  f"({shape.hot_share:.0%} to node0), seed {seed}, a sample every {sample_s:g}s, "
                  f"warm-up {warmup_s:g}s; logs in {log_dir}")
    cluster = Cluster(nodes, node_args, log_dir=str(log_dir))
    checks: list[Check] = []
    with cluster:
        probe, load, fds_before, problems = asyncio.run(
            _soak(cluster, shape, duration_s, sample_s, seed, engine, limits, console))
        soak_logs = {n.name: n.log_text() for n in cluster.nodes}  # what the nodes logged up to quiesce
    exit_codes = {n.name: n.proc.returncode if n.proc is not None else None for n in cluster.nodes}
    series = probe.series
    end_s = duration_s  # growth is judged on the loaded part of the run, not on quiesce
    for name in series:
        checks += growth_checks(name, series[name], limits, end_s)
    for node in cluster.nodes:
        checks += node_end_checks(node.name, series[node.name], fds_before[node.name],
                                  series[node.name].num_fds[-1], probe.gauges[node.name],
                                  probe.counters[node.name], limits)
    checks += client_checks(load, problems)
    checks += log_checks(soak_logs)
    notes = shutdown_notes({n.name: n.log_text()[len(soak_logs[n.name]):] for n in cluster.nodes}, exit_codes)
    ok = all(c.ok for c in checks)

    rows = _table_rows(series, load, probe.counters)
    console.print(render_table(rows))
    console.print(_summary(load, probe.counters, duration_s))
    console.print(checks_table(checks))
    for note in notes:
        console.print(f"[yellow]note[/] (not judged): {note}")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "soak.json", out_dir / "soak.png"
    config = {"minutes": minutes, "nodes": nodes, "engine": engine, "rate": shape.rate, "seed": seed,
              "sample_s": sample_s, "node_args": node_args, "shape": asdict(shape), "limits": asdict(limits)}
    json_path.write_text(json.dumps({
        "config": config, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.machine()}, {platform.python_version()})",
        "duration_s": duration_s, "series": {name: s.as_dict() for name, s in series.items()},
        "client": {"tallies": {name: asdict(t) for name, t in load.tallies.items()}, "done_at": load.done_at,
                   "ttft_s": load.ttft_s, "error_samples": load.error_samples},
        "node_counters": probe.counters, "exit_codes": exit_codes,
        "checks": [asdict(c) for c in checks], "shutdown_notes": notes, "ok": ok}))
    plot(series, load.done_at, duration_s, warmup_s,
         f"soak: {nodes} nodes ({engine}), {shape.rate:g} req/s for {duration_s / 60:g} min", png_path)
    console.print(f"{'[green]PASS[/]' if ok else '[red]FAIL[/]'}: {json_path}, {png_path}")
    return SoakResult(ok, checks, load, series, json_path, png_path, log_dir, probe.counters)


def _table_rows(series: dict[str, Series], load: LoadResult, counters: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    rows = []
    for name, s in series.items():
        rss = [v / 1024 for v in s.rss_kib]
        row: dict[str, Any] = {"process": name, "RSS start": f"{rss[0]:.1f}", "RSS end": f"{rss[-1]:.1f}",
                               "RSS max": f"{max(rss):.1f}", "fds start": s.num_fds[0], "fds end": s.num_fds[-1],
                               "fds max": max(s.num_fds)}
        if name in load.tallies:
            t, c = load.tallies[name], counters[name]
            row |= {"completed": t.completed, "hung up": t.hung_up, "errors": t.errors,
                    "stolen in": c["stolen_in"], "stolen out": c["stolen_out"], "steals tried": c["steals_attempted"]}
        rows.append(row)
    return rows


def _summary(load: LoadResult, counters: dict[str, dict[str, int]], duration_s: float) -> str:
    tallies = load.tallies.values()
    completed = sum(t.completed for t in tallies)
    ttft = sorted(load.ttft_s)
    ttft_text = (f"TTFT p50 {statistics.median(ttft):.3f}s, p99 {ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]:.3f}s"
                 if ttft else "no streamed completions")
    return (f"{completed} requests completed ({completed / duration_s:.2f}/s), "
            f"{sum(t.tokens for t in tallies)} tokens, {sum(t.hung_up for t in tallies)} clients hung up, "
            f"{sum(c['stolen_in'] for c in counters.values())} requests stolen, "
            f"{sum(c['resumed'] for c in counters.values())} resumed; {ttft_text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--engine", choices=["sim", "real"], default="sim")
    parser.add_argument("--rate", type=float, default=None,
                        help="requests per second, all nodes together (default: sim 7, real 2)")
    parser.add_argument("--out", default="out/soak", help="directory for soak.json, soak.png and the node logs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sample-s", type=float, default=None, help="sampling period (default: 1-5 s by length)")
    parser.add_argument("--warmup-s", type=float, default=None, help="not judged (default: 10%% of the run, >= 10 s)")
    parser.add_argument("--max-rss-growth-mib", type=float, default=Limits.max_rss_growth_mib)
    parser.add_argument("--max-fd-growth", type=int, default=Limits.max_fd_growth)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.nodes < 2 or (args.rate is not None and args.rate <= 0):
        parser.error("need --minutes > 0, --nodes >= 2 and --rate > 0")
    duration_s = args.minutes * 60
    warmup_s = args.warmup_s if args.warmup_s is not None else max(10.0, duration_s / 10)
    if warmup_s >= duration_s:
        parser.error("the warm-up must be shorter than the run")
    limits = Limits(warmup_s=warmup_s, max_rss_growth_mib=args.max_rss_growth_mib, max_fd_growth=args.max_fd_growth)
    result = run(args.minutes, args.nodes, args.engine, args.rate, args.out, args.seed, args.sample_s, warmup_s,
                 limits)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())

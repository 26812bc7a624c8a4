"""``make demo``: the seed scenario on a local cluster, stealing off and then on.

    python -m bench.demo [--nodes 3] [--requests 120] [--rate 25] [--out out/demo_latency.png]

Starts an embedded Redis and real node processes (simulated engine), sends the same
round-robin, heavy-tailed workload twice, and prints per-node counters and latency
percentiles for both runs, plus a PNG of the two latency distributions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .seed_scenario import Item, PhaseResult, percentile, run_phase, workload


def node_table(result: PhaseResult, received: dict[str, int]) -> Table:
    table = Table(title=f"{result.name}: per node")
    for column in ("node", "received", "ran locally", "stolen out", "stolen in", "busy s"):
        table.add_column(column, justify="right")
    for name, s in result.node_stats.items():
        table.add_row(name, str(received.get(name, 0)), str(s["ran_locally"]), str(s["stolen_out"]),
                      str(s["stolen_in"]), f"{s['busy_s']:.2f}")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--rate", type=float, default=18.0, help="requests per second, all nodes together")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--engine", choices=["real", "sim"], default="real",
                        help="real: the tiny model on CPU; sim: a cost model of a ~20 ms GPU step")
    parser.add_argument("--out", default="out/demo_latency.png")
    parser.add_argument("--timeline", default="out/demo_timeline.png")
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.requests < args.nodes or args.rate <= 0:
        print("error: need --nodes >= 2, --requests >= --nodes and --rate > 0", file=sys.stderr)
        return 2
    console = Console(width=max(120, Console().width))
    items = workload(args.requests, args.nodes, args.rate, args.seed)
    tokens = sum(it.max_tokens for it in items)
    console.print(f"[bold]seed scenario[/] ({args.engine} engine): {args.nodes} nodes, {args.requests} requests round-robin at "
                  f"{args.rate:g}/s, {tokens} output tokens (Pareto tail: longest {max(i.max_tokens for i in items)},"
                  f" median {sorted(i.max_tokens for i in items)[len(items) // 2]})")
    results = []
    with Progress(console=console) as progress:
        for name, stealing in (("stealing off", False), ("stealing on", True)):
            results.append(run_phase(name, stealing, items, args.nodes, progress, args.engine))
    # Same seeds, same model: every request must produce the same tokens wherever it ran.
    results[1].mismatches = sum(1 for i, toks in results[1].tokens.items() if toks != results[0].tokens.get(i))
    received = {f"node{n}": sum(1 for it in items if it.node == n) for n in range(args.nodes)}
    for result in results:
        console.print(node_table(result, received))
    summary = Table(title="latency per request (s), measured at the client")
    for column in ("run", "TTFT p50", "TTFT p99", "e2e p50", "e2e p90", "e2e p99", "makespan s", "errors",
                   "tokens differ from off"):
        summary.add_column(column, justify="right")
    for r in results:
        lat, ttft = list(r.latencies.values()), list(r.ttfts.values())
        summary.add_row(r.name, f"{percentile(ttft, 50):.2f}", f"{percentile(ttft, 99):.2f}",
                        f"{percentile(lat, 50):.2f}", f"{percentile(lat, 90):.2f}", f"{percentile(lat, 99):.2f}",
                        f"{r.wall_s:.2f}", str(r.errors), str(r.mismatches))
    console.print(summary)
    off, on = (list(r.ttfts.values()) for r in results)
    off_e2e, on_e2e = (list(r.latencies.values()) for r in results)
    console.print(f"stealing on vs off: TTFT p50 x{percentile(off, 50) / percentile(on, 50):.2f}, "
                  f"TTFT p99 x{percentile(off, 99) / percentile(on, 99):.2f}, "
                  f"e2e p99 x{percentile(off_e2e, 99) / percentile(on_e2e, 99):.2f} (higher is better); "
                  f"{sum(1 for i, n in results[1].served_by.items() if n != f'node{items[i].node}')} "
                  f"requests ran on a node other than the one nginx picked")
    plot(results, Path(args.out))
    timeline(results, items, args.nodes, Path(args.timeline))
    console.print(f"plots: {args.out} (latency distributions), {args.timeline} (which node ran what, and when)")
    return 0 if all(r.errors == 0 and r.mismatches == 0 for r in results) else 1


def plot(results: list[PhaseResult], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, attr, label in ((axes[0], "ttfts", "time to first token (s)"),
                            (axes[1], "latencies", "end-to-end latency (s)")):
        for r in results:
            values = sorted(getattr(r, attr).values())
            ax.plot(values, [i / len(values) for i in range(len(values))], label=r.name)
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("seed scenario: round-robin, heavy-tailed outputs, with and without stealing")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def timeline(results: list[PhaseResult], items: list[Item], num_nodes: int, out: Path) -> None:
    """One lane per node; a bar per request from its first token to its last, on the node that
    served it; orange when it was stolen, a thin line for the time it waited before its first token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(results), 1, figsize=(12, 3.2 * len(results)), sharex=True)
    for ax, r in zip(axes, results):
        lane_rows: dict[str, list[float]] = {f"node{n}": [] for n in range(num_nodes)}  # row -> busy until
        ticks = []
        for lane, node in enumerate(lane_rows):
            base = lane * 10
            ticks.append((base + 4, node))
            for i in sorted((i for i, n in r.served_by.items() if n == node), key=lambda i: r.spans[i][1]):
                sent, first, done = r.spans[i]
                rows = lane_rows[node]
                row = next((k for k, until in enumerate(rows) if until <= first), None)
                if row is None:
                    rows.append(0.0)
                    row = len(rows) - 1
                rows[row] = done
                y = base + (row % 9)
                stolen = node != f"node{items[i].node}"
                ax.plot([sent, first], [y, y], color="0.7", linewidth=0.8)
                ax.barh(y, done - first, left=first, height=0.8, color="tab:orange" if stolen else "tab:blue")
        ax.set_yticks([t for t, _ in ticks], [n for _, n in ticks])
        ax.set_title(f"{r.name}: blue = ran where nginx sent it, orange = stolen, grey = waiting for first token")
        ax.grid(True, axis="x", alpha=0.3)
    axes[-1].set_xlabel("seconds since the first request")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

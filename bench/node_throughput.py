"""Node throughput: output tokens/s through one node's HTTP streaming, beside the engine alone,
in one run, at several ``--max-num-seqs`` values.

    python -m bench.node_throughput [--engine sim|real] [--model small] [--device cpu]
        [--seqs 16,64,128] [--requests 256] [--max-tokens 256] [--prompt-tokens 32]
        [--sim-zero-cost] [--baseline-tree PATH] [--repeats 1] [--node-arg=--cuda-graphs]
        [--out out/node_throughput]

The workload: N requests with distinct prompts (token ids, so the node and the engine get the
same ones), ``max_tokens`` output tokens each, EOS ignored, seeded sampling at temperature 0.7,
all submitted at once. Phases, for each seqs value and repeat, interleaved so they share the
machine's noise:

- ``engine``: the engine in this process, built from the node's own flags by the node's own
  builder, stepped in a loop that admits requests as the node's scheduler does (up to
  max_num_seqs, and while the KV reservation fits);
- ``new``: one node (``--scheduler-name local``) started from this tree, all requests streamed
  at once by a client in several processes; tokens counted from each stream's usage. The
  progress line shows the CPU cores the node (with its child processes) and the client kept
  busy: on a small machine they compete, and the one near a full core is the limit;
- ``baseline`` (with ``--baseline-tree``): the same, the node started from another checkout
  (cwd and PYTHONPATH set to it, same python). The two trees swap order every other run.

``--sim-zero-cost`` sets every sim step cost the CLI can set to 0, so only the node's own work
counts; engine-alone tokens/s are then the sim engine's own Python cost and no ratio is drawn
against them. Results: a markdown table on stdout, ``results.json`` and ``node_throughput.png``
under ``--out``; node logs under ``--out``/logs. The best of the repeats counts (noise only
slows a run down); every run is in the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2psched.core.errors import ConfigError

from .node_bench_client import Job, run_load, summarize

REPO = Path(__file__).resolve().parents[1]
SIM_ZERO_COST = ["--sim-decode-step-ms", "0", "--sim-decode-ms-per-seq", "0", "--sim-prefill-ms-per-token", "0"]
SIM_KILOTOKEN_FLAG = "--sim-decode-ms-per-kilotoken"  # not in every tree yet: used where --help lists it
TEMPERATURE = 0.7
WARM_UP_REQUESTS, WARM_UP_TOKENS = 8, 16


@dataclass(frozen=True)
class Workload:
    num_requests: int
    max_tokens: int
    prompt_tokens: int

    def jobs(self, salt: int = 0) -> list[Job]:
        """Request i: its own prompt of byte-range ids (every preset's vocabulary has them) and seed i."""
        return [Job(i, _prompt(i, self.prompt_tokens, salt), self.max_tokens, i, TEMPERATURE)
                for i in range(self.num_requests)]

    def warm_up(self) -> Workload:
        return Workload(min(WARM_UP_REQUESTS, self.num_requests), min(WARM_UP_TOKENS, self.max_tokens),
                        self.prompt_tokens)


def _prompt(index: int, num_tokens: int, salt: int) -> list[int]:
    rng = random.Random(f"{salt}:{index}")
    return [rng.randrange(256) for _ in range(num_tokens)]


@dataclass(frozen=True)
class Tree:
    """A checkout nodes are started from."""

    label: str  # "new" or "baseline"
    path: Path
    has_kilotoken_flag: bool
    revision: str

    @classmethod
    def probe(cls, label: str, path: Path) -> Tree:
        if not (path / "p2psched" / "server.py").is_file():
            raise SystemExit(f"error: {path} is not a p2psched checkout (no p2psched/server.py)")
        help_text = subprocess.run([sys.executable, "-m", "p2psched.server", "--help"], cwd=path, env=_tree_env(path),
                                   check=False, capture_output=True, text=True, timeout=120).stdout
        return cls(label, path, SIM_KILOTOKEN_FLAG in help_text, _revision(path))


def _tree_env(path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(path)}


def _revision(path: Path) -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(path), *args], check=False, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


# ---- the engine alone ----------------------------------------------------------------------

def build_engine(node_args: list[str]) -> Any:
    """The engine a node started with ``node_args`` runs, built by the node's own code."""
    from p2psched.engine_factory import build_engine as build_in_engine_process
    from p2psched.server import build_parser, config_from_args

    engine, _ready = build_in_engine_process(config_from_args(build_parser().parse_args(node_args)))
    return engine


def drive(engine: Any, jobs: list[Job]) -> tuple[float, dict[str, int], int]:
    """Step the engine until every job is done; (seconds, output tokens per request, failed requests).

    All jobs are queued at once and admitted in order as the node's scheduler admits them:
    while a slot is free and the request's KV reservation fits."""
    from p2psched.core.engine import EngineRequest
    from p2psched.core.protocol import Sampling
    from p2psched.core.request import kv_reservation

    limits = engine.limits
    pending, running = deque(jobs), dict[str, int]()  # request id -> its KV reservation
    reserved, failed = 0, 0
    tokens = {f"r{job.index}": 0 for job in jobs}
    cap = limits.reserve_output_tokens
    started = time.perf_counter()
    while pending or running:
        while pending and len(running) < limits.max_num_seqs:
            job = pending[0]
            need = kv_reservation(len(job.prompt_token_ids), job.max_tokens, cap)
            if reserved + need > limits.max_kv_tokens:
                break
            pending.popleft()
            sampling = Sampling(max_tokens=job.max_tokens, seed=job.seed, temperature=job.temperature,
                                ignore_eos=True)
            engine.add(EngineRequest(f"r{job.index}", job.prompt_token_ids, sampling))
            running[f"r{job.index}"] = need
            reserved += need
        if not running:
            raise RuntimeError(f"a request needs more KV than the engine has ({limits.max_kv_tokens} tokens)")
        step = engine.step()
        for out in step.outputs:
            tokens[out.request_id] += len(out.new_token_ids)
            if out.finish_reason is not None:
                reserved -= running.pop(out.request_id)
                failed += out.finish_reason == "error"
    return time.perf_counter() - started, tokens, failed


def measure_engine(node_args: list[str], workload: Workload) -> dict[str, Any]:
    engine = build_engine(node_args)
    try:
        drive(engine, workload.warm_up().jobs(salt=1))
        seconds, tokens, failed = drive(engine, workload.jobs())
    finally:
        del engine
        _release_memory()
    total = sum(tokens.values())
    return {"requests": workload.num_requests, "succeeded": workload.num_requests - failed, "failed": failed,
            "short": sum(1 for n in tokens.values() if n != workload.max_tokens),
            "wall_s": seconds, "completion_tokens": total, "tokens_per_s": total / seconds}


def _release_memory() -> None:
    """Hand the engine's KV cache back before a node process sizes its own from free memory."""
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---- the node ------------------------------------------------------------------------------

def measure_node(tree: Tree, node_args: list[str], workload: Workload, client_procs: int, log_path: Path,
                 start_timeout: float) -> dict[str, Any]:
    from p2psched.cluster import NodeProcess
    from p2psched.redis_server import free_port

    port = free_port()
    node = NodeProcess(tree.label, port, ["--port", str(port), "--node-name", tree.label,
                                          "--scheduler-name", "local", *node_args],
                       log_path, extra_env={"PYTHONPATH": str(tree.path)}, cwd=tree.path)
    node.start()
    try:
        node.wait_healthy(start_timeout)
        run_load(node.url, workload.warm_up().jobs(salt=1), 1)
        assert node.pid is not None
        cpu_before = process_tree_cpu_s(node.pid)
        result = summarize(run_load(node.url, workload.jobs(), client_procs), workload.max_tokens)
        cpu_after = process_tree_cpu_s(node.pid)
        result["node_cpu_s"] = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    finally:
        if node.is_alive:
            try:
                node.terminate(30)
            except subprocess.TimeoutExpired:
                node.kill()
    return result


def process_tree_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process and its live descendants (an engine process,
    where the node has one), from /proc; None where there is no /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    try:
        while todo:
            current = todo.pop()
            try:
                fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
                for task in Path(f"/proc/{current}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
                continue
    except OSError:
        return None
    return total


# ---- the run -------------------------------------------------------------------------------

def node_args_for(args: argparse.Namespace, seqs: int, tree: Tree | None) -> list[str]:
    """The node's flags for this run; ``tree`` decides whether the kilotoken cost flag exists
    (None: the tree this process imports)."""
    out = ["--engine", args.engine, "--max-num-seqs", str(seqs), "--log-level", "warning"]
    if args.model:
        out += ["--model", args.model]
    if args.engine == "real":
        out += ["--device", args.device, "--dtype", args.dtype]
    if args.sim_zero_cost:
        out += SIM_ZERO_COST
        if tree is not None and tree.has_kilotoken_flag:
            out += [SIM_KILOTOKEN_FLAG, "0"]
    for extra in args.node_arg:
        out += shlex.split(extra)
    return out


def phases(args: argparse.Namespace, trees: list[Tree]) -> Iterator[tuple[int, int, str]]:
    """(seqs, repeat, phase) in run order: per seqs value, each repeat runs the engine alone, then
    the trees, in reverse order every other time (so neither always follows the engine)."""
    turn = 0
    for seqs in args.seqs:
        for repeat in range(args.repeats):
            yield seqs, repeat, "engine"
            for tree in trees if turn % 2 == 0 else trees[::-1]:
                yield seqs, repeat, tree.label
            turn += 1


def run_all(args: argparse.Namespace, trees: list[Tree], workload: Workload, out_dir: Path) -> list[dict[str, Any]]:
    plan = list(phases(args, trees))
    runs = []
    new_tree = next(t for t in trees if t.label == "new")
    for k, (seqs, repeat, phase) in enumerate(plan, 1):
        began = time.monotonic()
        if phase == "engine":
            result = measure_engine(node_args_for(args, seqs, new_tree), workload)
        else:
            tree = next(t for t in trees if t.label == phase)
            log_path = out_dir / "logs" / f"{phase}-seqs{seqs}-rep{repeat + 1}.log"
            log_path.unlink(missing_ok=True)
            result = measure_node(tree, node_args_for(args, seqs, tree), workload, args.client_procs, log_path,
                                  args.start_timeout)
        runs.append({"seqs": seqs, "repeat": repeat + 1, "phase": phase, **result})
        ttft = f"  TTFT p50 {result['ttft_p50_s']:.3f} s" if result.get("ttft_p50_s") is not None else ""
        if result.get("node_cpu_s") is not None:  # above 1 core: the node or the client may be the limit
            ttft += (f"  CPU cores busy: node {result['node_cpu_s'] / result['wall_s']:.2f},"
                     f" client {result['client_cpu_s'] / result['wall_s']:.2f}")
        print(f"[{k}/{len(plan)}] {phase:<8} seqs={seqs:<4} repeat {repeat + 1}/{args.repeats}: "
              f"{result['tokens_per_s']:9.0f} tok/s  {result['succeeded']}/{result['requests']} ok"
              f"{ttft}  ({time.monotonic() - began:.1f} s)", flush=True)
        for example in result.get("failure_examples", []):
            print(f"    failed {example}", flush=True)
    return runs


def summarize_runs(runs: list[dict[str, Any]], seqs_values: list[int], zero_cost: bool) -> list[dict[str, Any]]:
    """One row per seqs value: the best run of each phase, and the ratios between them."""
    rows = []
    for seqs in seqs_values:
        row: dict[str, Any] = {"seqs": seqs}
        for phase in ("engine", "baseline", "new"):
            mine = [r for r in runs if r["seqs"] == seqs and r["phase"] == phase]
            if not mine:
                continue
            best = max(mine, key=lambda r: r["tokens_per_s"])
            row[phase] = {**best, "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                          "all_tokens_per_s": [r["tokens_per_s"] for r in mine],
                          "failed_total": sum(r["failed"] for r in mine)}
        row["node_over_engine"] = None if zero_cost else _ratio(row, "new", "engine")
        row["baseline_over_engine"] = None if zero_cost else _ratio(row, "baseline", "engine")
        row["new_over_baseline"] = _ratio(row, "new", "baseline")
        rows.append(row)
    return rows


def _ratio(row: dict[str, Any], top: str, bottom: str) -> float | None:
    if top not in row or bottom not in row or not row[bottom]["tokens_per_s"]:
        return None
    return float(row[top]["tokens_per_s"] / row[bottom]["tokens_per_s"])


def markdown_table(rows: list[dict[str, Any]], has_baseline: bool, zero_cost: bool) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    def latency(node: dict[str, Any]) -> str:
        per_chunk = 1 / node["chunks_per_token"] if node["chunks_per_token"] else None
        return (f"{num(node['ttft_p50_s'], '.3f')} | {num(node['ttft_p99_s'], '.3f')} | "
                f"{num(node['inter_chunk_p50_ms'], '.1f')} | {num(per_chunk, '.1f')}")

    engine_label = "sim engine alone (zero cost) tok/s" if zero_cost else "engine alone tok/s"
    header = ["seqs", engine_label]
    if has_baseline:
        header += ["baseline node tok/s", "new node tok/s", "new/baseline"]
    else:
        header += ["node tok/s"]
    if not zero_cost:
        header += ["node/engine"] + (["baseline node / new engine"] if has_baseline else [])
    latency_columns = ["TTFT p50 s", "TTFT p99 s", "inter-chunk p50 ms", "tokens/chunk"]
    header += [f"new {c}" for c in latency_columns] if has_baseline else latency_columns
    if has_baseline:
        header += [f"baseline {c}" for c in latency_columns]
    header += ["failed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        new, cells = row["new"], [str(row["seqs"]), f"{row['engine']['tokens_per_s']:.0f}"]
        if has_baseline:
            cells += [f"{row['baseline']['tokens_per_s']:.0f}", f"{new['tokens_per_s']:.0f}",
                      num(row["new_over_baseline"], ".2f")]
        else:
            cells += [f"{new['tokens_per_s']:.0f}"]
        if not zero_cost:
            cells += [num(row["node_over_engine"], ".2f")]
            if has_baseline:
                cells += [num(row["baseline_over_engine"], ".2f")]
        cells += [latency(new)]
        if has_baseline:
            cells += [latency(row["baseline"])]
        failed = sum(row[p]["failed_total"] for p in ("engine", "baseline", "new") if p in row)
        cells += [str(failed)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = [r["seqs"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    has_baseline = all("baseline" in r for r in rows)
    for phase, label, style in (("engine", "engine alone", "k--"), ("baseline", "node (baseline)", "C1o-"),
                                ("new", "node (new)" if has_baseline else "node", "C0o-")):
        if all(phase in r for r in rows):
            left.plot(seqs, [r[phase]["tokens_per_s"] for r in rows], style, label=label)
            if phase != "engine":
                right.plot(seqs, [r[phase]["ttft_p50_s"] or 0 for r in rows], style, label=f"{label} p50")
                right.plot(seqs, [r[phase]["ttft_p99_s"] or 0 for r in rows], style.replace("-", ":"),
                           label=f"{label} p99")
    left.set_ylabel("output tokens/s")
    right.set_ylabel("time to first token (s)")
    for ax in (left, right):
        ax.set_xlabel("max num seqs")
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs, [str(s) for s in seqs])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = ""
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                 platform.processor() or platform.machine())
    return f"{model}, {os.cpu_count()} CPUs"


def _seqs_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("--seqs takes a comma-separated list of positive integers")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.node_throughput",
                                description="Output tokens/s of one node (streamed HTTP) beside its engine alone.")
    p.add_argument("--engine", choices=["sim", "real"], default="sim")
    p.add_argument("--model", default="", help="preset or model directory (default: the node's: sim, or tiny)")
    p.add_argument("--device", default="auto", help="real engine: auto, cpu, cuda (default %(default)s)")
    p.add_argument("--dtype", default="auto", help="real engine (default %(default)s)")
    p.add_argument("--seqs", type=_seqs_list, default=[16, 64, 128],
                   help="comma-separated max-num-seqs values (default 16,64,128)")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--sim-zero-cost", action="store_true",
                   help="every sim step cost the node's CLI has set to 0: only the node's own work counts")
    p.add_argument("--node-arg", action="append", default=[],
                   help="extra node flags (repeatable; shell-split), e.g. --node-arg=--cuda-graphs")
    p.add_argument("--baseline-tree", default="", help="another checkout: its nodes are measured too")
    p.add_argument("--repeats", type=int, default=1, help="runs of each phase, interleaved; the best counts")
    p.add_argument("--client-procs", type=int, default=min(4, os.cpu_count() or 1),
                   help="client processes sharing the streams (default min(4, CPUs))")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a node to answer /health")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default="out/node_throughput")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.requests < 1 or args.max_tokens < 1 or args.prompt_tokens < 1 or args.repeats < 1:
        print("error: --requests, --max-tokens, --prompt-tokens and --repeats must be >= 1", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    workload = Workload(args.requests, args.max_tokens, args.prompt_tokens)
    trees = [Tree.probe("new", REPO)]
    if args.baseline_tree:
        trees.insert(0, Tree.probe("baseline", Path(args.baseline_tree).resolve()))
    started_at = datetime.datetime.now(datetime.UTC)
    what = (f"{args.engine} engine{' (zero cost)' if args.sim_zero_cost else ''}"
            f"{', model ' + args.model if args.model else ''}"
            f"{', ' + args.device if args.engine == 'real' else ''}: {args.requests} requests x "
            f"{args.max_tokens} tokens, prompts of {args.prompt_tokens}, all at once")
    print(f"node throughput, {what}; seqs {','.join(map(str, args.seqs))}, {args.repeats} repeat(s), "
          f"{args.client_procs} client processes; {machine()}", flush=True)
    for tree in trees:
        kilotoken = "0" if tree.has_kilotoken_flag else "the default (no flag in this tree)"
        extra = f", sim decode ms per kilotoken: {kilotoken}" if args.sim_zero_cost else ""
        print(f"  {tree.label}: {tree.path} @ {tree.revision}{extra}", flush=True)
    if args.sim_zero_cost and len({t.has_kilotoken_flag for t in trees}) > 1:
        print("  warning: only one tree can zero the per-kilotoken sim cost: the trees' sim costs differ",
              flush=True)
    try:
        runs = run_all(args, trees, workload, out_dir)
    except (RuntimeError, ConfigError) as exc:  # bad node flags, a node that did not start, a dead client
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rows = summarize_runs(runs, args.seqs, args.sim_zero_cost)
    table = markdown_table(rows, len(trees) > 1, args.sim_zero_cost)
    print()
    print(f"{what}; best of {args.repeats}; {machine()}; {started_at:%Y-%m-%d}")
    print()
    print(table)
    results = {
        "meta": {"date": started_at.isoformat(timespec="seconds"), "machine": machine(),
                 "command": " ".join(["python -m bench.node_throughput", *(argv if argv is not None else sys.argv[1:])]),
                 "python": sys.version.split()[0], "workload": vars(workload) | {"temperature": TEMPERATURE},
                 "trees": [{"label": t.label, "path": str(t.path), "revision": t.revision,
                            "sim_kilotoken_zeroed": args.sim_zero_cost and t.has_kilotoken_flag} for t in trees],
                 "options": {k: v for k, v in vars(args).items()}},
        "summary": rows, "runs": runs, "table": table}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    written = [str(out_dir / "results.json")]
    if not args.no_plot:
        plot(rows, out_dir / "node_throughput.png", what)
        written.append(str(out_dir / "node_throughput.png"))
    print(f"\nwritten: {', '.join(written)}")
    failed = sum(r["failed"] + r.get("short", 0) for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

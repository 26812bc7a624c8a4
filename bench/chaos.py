"""``python -m bench.chaos``: a seeded chaos run against a local cluster, then a strict check.

    python -m bench.chaos --requests 600 --faults 24 --seed 7 [--nodes 4] [--rate R]
                          [--replay out/chaos-seed7/schedule.json] [--out DIR]

Loopback only, bounded in requests and time. Starts an embedded Redis and N sim nodes, each
behind two TCP proxies (``bench/tcp_proxy.py``, in this process) in front of its ZeroMQ steal
and result ports: nodes bind X/Y, advertise the proxies' ports, so every inbound peer link
crosses a proxy that can delay it or cut it. Then it streams the seeded workload
(``bench/chaos_schedule.py``: most traffic to one or two nodes, so stealing is constant) while
the seeded fault schedule fires (``bench/chaos_faults.py``): kill -9 of thieves in prefill,
mid-decode and just before the last token, and of origins; SIGSTOP/SIGCONT of thieves and
origins, shorter and longer than the lease timeout; engine stalls (SIGUSR1: the next engine
step hangs ``--sim-stall-s`` while the event loop runs on) of thieves and origins; Redis
restarts and FLUSHALL; link delays and cuts. Killed nodes come back on the same ports. The
last node has a shorter context and a slower engine; each request goes only to nodes that can
hold it, except door probes (a 400 expected). The TTL is shorter than the longest requests
run. After the last request it restores everything, waits for quiesce, reads every node's
gauges, and runs the checker (``bench/chaos_checker.py``).

Out dir (default ``out/chaos-seed<seed>``): ``schedule.json`` (what ``--replay`` takes),
``summary.json``, ``faults.json`` (what each fault hit, and the skipped ones),
``records.jsonl`` (every request as the client saw it), ``timeline.png``, ``logs/`` (node logs).
Exit code 0 when the checker passes, 1 when it fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from bench.chaos_checker import (
    COMPLETED,
    DROPPED,
    ENDED_EARLY,
    ERROR_EVENT,
    HUNG,
    LEAK_GAUGES,
    NOT_ACCEPTED,
    OPTIONAL_LEAK_GAUGES,
    REJECTED,
    Chunk,
    FaultEvent,
    Report,
    RequestRecord,
    Rules,
    check,
    leaks,
)
from bench.chaos_faults import DOWN, Injector, Live, Rig, Skipped
from bench.chaos_plot import timeline
from bench.chaos_schedule import (
    STALL_KINDS,
    VOCAB,
    ChaosPlan,
    RequestSpec,
    make_plan,
    make_workload,
)
from bench.tcp_proxy import ProxyThread
from p2psched.cluster import Cluster, NodeProcess
from p2psched.redis_server import EmbeddedRedis
from p2psched.sim_engine import expected_tokens

START_DELAY_S = 0.3  # between the driver's clock zero and the first request
CONNECT_TRIES = 20  # a node that is down: try the next one, this many times in all
READ_TIMEOUT_S = 30.0  # a stream silent this long counts as hung
DRAIN_S = 60.0  # after the last request is due, how long the stragglers get
QUIESCE_S = 20.0  # after everything is restored, how long the gauges get to reach 0
NODE_STATS = ("received", "rejected", "completed", "failed", "stolen_in", "stolen_out", "resumed", "lease_expiries",
              "handed_back", "handbacks_received", "stream_gaps", "duplicate_items", "stale_items", "origin_losses",
              "registry_errors", "sends_failed")


@dataclass
class ChaosResult:
    plan: ChaosPlan
    report: Report
    records: list[RequestRecord]
    events: list[FaultEvent]
    skipped: list[Skipped]
    gauges: dict[str, dict[str, float] | None]
    node_stats: dict[str, dict[str, Any]]
    out_dir: Path
    wall_s: float
    quiesce_s: float = 0.0  # from "everything restored" to every gauge at 0 (or the timeout)
    notes: list[str] = field(default_factory=list)
    log_problems: list[str] = field(default_factory=list)  # ERROR lines and tracebacks in node logs
    node_code: str = ""  # the source tree the nodes ran from, when not this one

    @property
    def stolen_requests(self) -> int:
        """Requests whose tokens came, at least in part, from a node other than their origin."""
        return sum(1 for r in self.records if any(c.served_by and c.served_by != r.origin for c in r.chunks))

    @property
    def resumed_requests(self) -> int:
        return sum(1 for r in self.records if any((c.attempts or 1) > 1 for c in r.chunks))

    @property
    def door_probes(self) -> int:
        return sum(1 for r in self.records if r.is_door_probe)

    @property
    def stalls_seen(self) -> int:
        """Engine stalls whose 503 ``engine_stalled`` the injector saw on /health."""
        return sum(1 for e in self.events if e.kind in STALL_KINDS and e.observed)


# ---- the client ----

class _Client:
    def __init__(self, rig: Rig, injector: Injector, session: aiohttp.ClientSession, lives: dict[int, Live],
                 start: float, deadline: float, on_done: Callable[[], None], contexts: dict[str, int]):
        self.rig = rig
        self.contexts = contexts  # node name -> context length: where a request may be sent
        self.injector = injector
        self.session = session
        self.lives = lives
        self.start = start
        self.deadline = deadline  # driver clock
        self.on_done = on_done
        self.records: dict[int, RequestRecord] = {}

    async def request(self, spec: RequestSpec) -> None:
        clock = self.rig.clock
        await asyncio.sleep(max(0.0, self.start + spec.send_at_s - clock()))
        expected = expected_tokens(spec.seed, spec.prompt_token_ids, spec.max_tokens, VOCAB)
        record = RequestRecord(spec.index, "", expected, clock(), NOT_ACCEPTED, context_tokens=spec.context_tokens,
                               is_door_probe=spec.is_door_probe)
        self.records[spec.index] = record
        live = Live(spec)
        try:
            async with asyncio.timeout(max(0.1, self.deadline - clock())):
                await self._stream(spec, record, live)
        except TimeoutError:
            record.outcome, record.error = HUNG, record.error or "still open when the driver stopped waiting"
        finally:
            record.ended_at = clock()
            self.lives.pop(spec.index, None)
            self.on_done()

    def _pick(self, spec: RequestSpec, attempt: int) -> NodeProcess:
        """The target first, then (while it is down) the others that can hold the request in
        turn. A door probe goes to its target only: the 400 is what it is for."""
        nodes = self.rig.cluster.nodes
        if spec.is_door_probe:
            return nodes[spec.node]
        order = [nodes[(spec.node + j) % len(nodes)] for j in range(len(nodes))]
        order = [n for n in order if self.contexts[n.name] >= spec.context_tokens]
        candidates = [n for n in order if self.rig.state[n.name] != DOWN] or order
        return candidates[attempt % len(candidates)]

    async def _stream(self, spec: RequestSpec, record: RequestRecord, live: Live) -> None:
        clock = self.rig.clock
        body = {"model": "sim", "prompt": spec.prompt_token_ids, "max_tokens": spec.max_tokens, "seed": spec.seed,
                "stream": True, "return_token_ids": True}
        for attempt in range(CONNECT_TRIES):
            node = self._pick(spec, attempt)
            record.origin = live.origin = node.name
            try:
                async with self.session.post(node.url + "/v1/completions", json=body) as resp:
                    record.status = resp.status
                    if resp.status != 200:
                        record.outcome, record.error = REJECTED, (await resp.text())[:300]
                        return
                    record.accepted_at = clock()
                    record.outcome, record.error = DROPPED, ""  # until the stream says otherwise
                    self.lives[spec.index] = live
                    saw_error = False
                    async for raw in resp.content:
                        line = raw.strip()
                        if not line.startswith(b"data: "):
                            continue
                        data = line[len(b"data: "):]
                        if data == b"[DONE]":
                            record.saw_done = True
                            break
                        payload = json.loads(data)
                        if "error" in payload:
                            saw_error = True
                            record.error = str(payload["error"].get("message", payload["error"]))[:300]
                            continue
                        self._on_chunk(payload, record, live)
                    is_final = any(c.finish_reason is not None for c in record.chunks)
                    record.outcome = ERROR_EVENT if saw_error else COMPLETED if (is_final and record.saw_done) \
                        else ENDED_EARLY
                    return
            except aiohttp.ClientConnectorError as exc:  # nothing listens: the node is down
                record.error = f"connect: {exc}"
                await asyncio.sleep(0.1)
            except TimeoutError:
                record.outcome, record.error = HUNG, f"no data for {READ_TIMEOUT_S:.0f}s"
                return
            except (aiohttp.ClientError, ConnectionError) as exc:
                record.outcome, record.error = DROPPED, repr(exc)[:300]
                return
        record.outcome = NOT_ACCEPTED

    def _on_chunk(self, payload: dict[str, Any], record: RequestRecord, live: Live) -> None:
        choice = payload["choices"][0]
        meta = payload.get("p2psched") or {}
        chunk = Chunk(self.rig.clock(), list(choice.get("token_ids") or []), choice.get("finish_reason"),
                      meta.get("served_by"), meta.get("attempts"))
        record.chunks.append(chunk)
        if chunk.served_by:
            live.server = chunk.served_by
        live.delivered += len(chunk.token_ids)
        live.last_chunk_at = chunk.t
        self.injector.on_chunk(live)


# ---- gauges ----

async def read_gauges(session: aiohttp.ClientSession, node: NodeProcess) -> dict[str, float] | None:
    """The leak gauges from the node's /metrics; None if it does not answer."""
    wanted = set(LEAK_GAUGES) | set(OPTIONAL_LEAK_GAUGES)
    try:
        async with session.get(node.url + "/metrics", timeout=aiohttp.ClientTimeout(total=3)) as resp:
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        if name in wanted:
            values[name] = values.get(name, 0.0) + float(value)
    return values


async def read_stats(session: aiohttp.ClientSession, node: NodeProcess) -> dict[str, Any]:
    try:
        async with session.get(node.url + "/stats", timeout=aiohttp.ClientTimeout(total=3)) as resp:
            body: dict[str, Any] = await resp.json()
            return {k: body["stats"].get(k) for k in NODE_STATS}
    except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
        return {}


async def quiesce(session: aiohttp.ClientSession, nodes: list[NodeProcess], timeout: float
                  ) -> dict[str, dict[str, float] | None]:
    """Poll every node's gauges until none leaks or ``timeout`` passes; the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        readings = await asyncio.gather(*(read_gauges(session, node) for node in nodes))
        gauges = dict(zip((node.name for node in nodes), readings))
        if not leaks(gauges) or time.monotonic() > deadline:
            return gauges
        await asyncio.sleep(0.25)


# ---- one run ----

def schedule_text(plan: ChaosPlan) -> str:
    """The schedule as JSON, one fault per line."""
    data = plan.to_json()
    faults = data.pop("faults")
    head = json.dumps(data)[:-1]
    lines = ",\n ".join(json.dumps(f) for f in faults)
    return f'{head}, "faults": [\n {lines}\n]}}'


def code_version() -> str:
    """HEAD plus a digest of uncommitted changes under p2psched/ and server/: which node code ran."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "p2psched", "server"], cwd=root, capture_output=True,
                              timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+{hashlib.sha256(diff).hexdigest()[:12]}" if diff else head


def stable_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Free ports *outside* the kernel's ephemeral range. A node restarted after kill -9 binds
    its ports again; a port from the ephemeral range may meanwhile be the local end of some
    outgoing connection (the client opens many), and the bind then fails."""
    low, high = 32768, 60999
    with contextlib.suppress(OSError, ValueError):
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    pool = range(10000, low) if low - 10000 >= 2000 else range(high + 1, 65536)
    rng = random.SystemRandom()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.choice(pool)
        if port in ports:
            continue
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                continue
        ports.append(port)
    return ports


def run_chaos(plan: ChaosPlan, out_dir: Path, console: Console | None = None,
              node_code: Path | None = None) -> ChaosResult:
    """Run ``plan`` on a fresh local cluster; write the out dir; return the checked result.
    ``node_code``: a source tree (with ``p2psched/`` and ``server/``) the nodes import instead of
    this one, e.g. an older commit exported with ``git archive``."""
    console = console or Console(quiet=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = out_dir / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    plan.save(out_dir / "schedule.json")
    # Per node: HTTP, bound steal and result, and the proxies' (advertised) steal and result; Redis.
    flat = stable_ports(5 * plan.num_nodes + 1)
    ports = [flat[5 * i:5 * i + 5] for i in range(plan.num_nodes)]
    per_node = [["--steal-port", str(steal), "--result-port", str(result), "--advertise-steal-port", str(p_steal),
                 "--advertise-result-port", str(p_result), *(plan.per_node_args[i] if plan.per_node_args else [])]
                for i, (_, steal, result, p_steal, p_result) in enumerate(ports)]
    began = time.monotonic()
    with ProxyThread() as proxies, EmbeddedRedis(port=flat[-1]) as redis_server:
        for i, (_, steal, result, p_steal, p_result) in enumerate(ports):
            proxies.add(f"node{i}/steal", p_steal, steal)
            proxies.add(f"node{i}/result", p_result, result)
        cluster = Cluster(plan.num_nodes, plan.node_args, topic=f"chaos{uuid.uuid4().hex[:8]}",
                          log_dir=str(log_dir), redis=redis_server, per_node_args=per_node,
                          http_ports=[p[0] for p in ports])
        if node_code is not None:
            for node in cluster.nodes:
                node.cwd = node_code.resolve()  # ``python -m`` imports from its working directory first
        with cluster:
            console.print(f"cluster up: redis {cluster.redis.url}, "
                          + ", ".join(f"{n.name} {n.url}" for n in cluster.nodes) + f"; logs {log_dir}")
            result_ = asyncio.run(_drive(plan, cluster, proxies, console))
    result_.wall_s = time.monotonic() - began
    result_.out_dir = out_dir
    result_.node_code = str(node_code.resolve()) if node_code is not None else ""
    write_outputs(result_)
    return result_


async def _drive(plan: ChaosPlan, cluster: Cluster, proxies: ProxyThread, console: Console) -> ChaosResult:
    zero = time.monotonic()

    def clock() -> float:
        return time.monotonic() - zero

    notes: list[str] = []

    def note(text: str) -> None:
        line = f"[{clock():7.2f}s] {text}"
        notes.append(line)
        console.print(line, highlight=False, markup=False)

    rig = Rig(cluster, proxies, clock)
    specs = make_workload(plan)
    lives: dict[int, Live] = {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=READ_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)  # a fresh connection per request
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        injector = Injector(rig, plan, lives, session, note)
        start = clock() + START_DELAY_S
        deadline = start + plan.send_window_s + DRAIN_S
        with progress:
            requests_bar = progress.add_task("requests finished", total=len(specs))
            faults_bar = progress.add_task("faults fired", total=len(plan.faults))

            def on_done() -> None:
                progress.advance(requests_bar)
                progress.update(faults_bar, completed=len(injector.events) + len(injector.skipped))

            client = _Client(rig, injector, session, lives, start, deadline, on_done, plan.contexts)
            async with asyncio.TaskGroup() as group:
                for fault in plan.faults:
                    group.create_task(_fault_then_tick(injector, fault, start, progress, faults_bar))
                for spec in specs:
                    group.create_task(client.request(spec))
        note(f"all requests ended; {len(injector.events)} fault(s) fired, {len(injector.skipped)} skipped; "
             "restoring and waiting for quiesce")
        await injector.restore()
        restored = clock()
        gauges = await quiesce(session, cluster.nodes, QUIESCE_S)
        quiesce_s = clock() - restored
        stats = await asyncio.gather(*(read_stats(session, node) for node in cluster.nodes))
    records = [client.records[spec.index] for spec in specs]
    events = sorted(injector.events, key=lambda e: e.at)
    report = check(records, events, gauges, Rules(plan.contexts, plan.ttl_s, plan.lease_timeout))
    return ChaosResult(plan, report, records, events, injector.skipped, gauges,
                       dict(zip((n.name for n in cluster.nodes), stats)), Path("."), 0.0, quiesce_s, notes,
                       log_problems(cluster.nodes))


def log_problems(nodes: list[NodeProcess]) -> list[str]:
    """ERROR/CRITICAL lines and the last line of each traceback in the nodes' logs: bugs the
    clients may not see (a loop that died, an exception swallowed by a handler)."""
    found: list[str] = []
    for node in nodes:
        lines = node.log_text().splitlines()
        for k, line in enumerate(lines):
            if " ERROR " in line or " CRITICAL " in line:
                found.append(f"{node.name}: {line.strip()[:300]}")
            elif line.startswith("Traceback"):
                end = next((j for j in range(k + 1, len(lines)) if lines[j] and not lines[j].startswith(" ")), k)
                found.append(f"{node.name}: traceback: {lines[end].strip()[:300]}")
    return found


async def _fault_then_tick(injector: Injector, fault: Any, start: float, progress: Progress, bar: TaskID) -> None:
    await injector.run(fault, start)
    progress.update(bar, completed=len(injector.events) + len(injector.skipped))


# ---- outputs ----

def summary_table(result: ChaosResult) -> Table:
    r = result.report
    table = Table(title=f"chaos run: seed {result.plan.seed}, {result.plan.num_nodes} nodes, "
                        f"{result.wall_s:.0f}s", show_header=True)
    table.add_column("check")
    table.add_column("value", justify="right")
    plan = result.plan
    contexts = plan.contexts
    odd = ", ".join(f"node{i} {' '.join(args)}" for i, args in enumerate(plan.per_node_args) if args) or "none"
    thieves = ", ".join(f"{name} {count} (largest {r.largest_stolen[name]}/{contexts.get(name, '?')})"
                        for name, count in r.stolen_by.items()) or "-"
    rows: list[tuple[str, str]] = [
        ("nodes unlike the others", odd),
        ("requests sent", str(r.sent)),
        ("accepted (HTTP 200)", str(r.accepted)),
        ("completed exactly once, exact tokens", str(r.completed_exactly)),
        ("errored because their origin was killed", str(r.errored_origin_died)),
        ("not accepted (no node reachable)", str(r.not_accepted)),
        ("door probes refused 400 over the node's context (expected)",
         f"{r.refused_over_context} of {result.door_probes}"),
        ("stolen (client view) / resumed (attempts > 1)", f"{result.stolen_requests} / {result.resumed_requests}"),
        ("stolen per thief (largest request tokens / its context)", thieves),
        (f"TTL {plan.ttl_s:g}s: longest wait to first token; first token later than the TTL",
         f"{r.max_wait_s:.2f}s; {r.started_after_ttl}"),
        ("exact, streamed by a thief past the TTL / resumed past the TTL",
         f"{r.stolen_past_ttl} / {r.resumed_past_ttl}"),
        ("timed out waiting (no token, client waited >= TTL; legal)", str(r.timed_out_waiting)),
        ("LOST", str(r.lost)),
        ("duplicated tokens (requests / tokens)", f"{r.duplicated} / {r.duplicated_tokens}"),
        ("missing tokens (requests / tokens)", f"{r.missing} / {r.missing_tokens}"),
        ("wrong tokens or ending (requests)", str(r.wrong)),
        ("over a node's context (accepted, or stolen by a shorter thief)", str(r.over_context)),
    ]
    for gauge in LEAK_GAUGES + OPTIONAL_LEAK_GAUGES:
        found = [leak for leak in r.leaks if leak.gauge == gauge]
        if gauge in OPTIONAL_LEAK_GAUGES and not found:
            continue
        rows.append((f"leak: {gauge}", ", ".join(f"{lk.node}={lk.value}" for lk in found) or "0"))
    for leak in r.leaks:
        if leak.gauge == "unreachable":
            rows.append((f"leak check: {leak.node}", "unreachable"))
    kinds = ", ".join(f"{k} {n}" for k, n in r.faults_by_kind.items())
    injected = f"{r.faults_injected} of {len(result.plan.faults)} scheduled ({len(result.skipped)} skipped)"
    rows.append(("faults injected", injected))
    rows.append(("faults by kind", kinds or "-"))
    stalls = sum(n for k, n in r.faults_by_kind.items() if k.startswith("engine_stall"))
    rows.append(("engine stalls seen on /health (503 engine_stalled)", f"{result.stalls_seen} of {stalls}"))
    rows.append(("stolen requests taken back from a stalled thief / kept by it (fail)",
                 f"{r.taken_from_stalled} / {r.held_through_stall}"))
    rows.append(("quiesce (restored -> gauges at 0)", f"{result.quiesce_s:.1f}s"))
    rows.append(("node log ERRORs / tracebacks (not judged)", str(len(result.log_problems))))
    rows.append(("verdict", "PASS" if r.ok else "FAIL"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def summary_json(result: ChaosResult) -> dict[str, Any]:
    report = dataclasses.asdict(result.report)
    report["ok"] = result.report.ok
    return {
        "seed": result.plan.seed, "nodes": result.plan.num_nodes, "requests": result.plan.num_requests,
        "faults_scheduled": len(result.plan.faults), "wall_s": round(result.wall_s, 2),
        "rate": result.plan.rate, "ttl_s": result.plan.ttl_s, "stall_s": result.plan.stall_s,
        "contexts": result.plan.contexts, "per_node_args": result.plan.per_node_args,
        "door_probes": result.door_probes, "engine_stalls_seen": result.stalls_seen,
        "code_version": f"nodes from {result.node_code}" if result.node_code else code_version(),
        "stolen_requests": result.stolen_requests,
        "resumed_requests": result.resumed_requests, "report": report,
        "skipped_faults": [dataclasses.asdict(s) for s in result.skipped],
        "gauges_after_quiesce": result.gauges, "quiesce_s": round(result.quiesce_s, 2),
        "node_stats_since_last_start": result.node_stats, "node_log_problems": result.log_problems,
    }


def write_outputs(result: ChaosResult) -> None:
    out = result.out_dir
    (out / "summary.json").write_text(json.dumps(summary_json(result), indent=1) + "\n")
    (out / "faults.json").write_text(json.dumps({
        "fired": [dataclasses.asdict(e) for e in result.events],
        "skipped": [dataclasses.asdict(s) for s in result.skipped], "log": result.notes}, indent=1) + "\n")
    with open(out / "records.jsonl", "w") as f:
        f.writelines(json.dumps({
            "index": r.index, "origin": r.origin, "outcome": r.outcome, "status": r.status, "error": r.error,
            "sent_at": round(r.sent_at, 4), "accepted_at": r.accepted_at, "ended_at": r.ended_at,
            "saw_done": r.saw_done, "expected_len": len(r.expected), "context_tokens": r.context_tokens,
            "is_door_probe": r.is_door_probe, "tokens": r.tokens, "expected": r.expected,
            # [t, number of tokens, served_by (when named), attempts (when named), finish_reason]
            "chunks": [[round(c.t, 4), len(c.token_ids), c.served_by, c.attempts, c.finish_reason]
                       for c in r.chunks]}) + "\n" for r in result.records)
    with contextlib.suppress(Exception):  # a plot is a convenience; the check stands without it
        timeline(result.records, result.events, [f"node{i}" for i in range(result.plan.num_nodes)],
                 out / "timeline.png", f"chaos seed {result.plan.seed}: requests per node, faults shaded")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--faults", type=int, default=24)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.0, help="requests per second (default: 1.5 per node)")
    parser.add_argument("--replay", default="", help="a schedule.json from an earlier run: run exactly that plan")
    parser.add_argument("--out", default="", help="output directory (default out/chaos-seed<seed>)")
    parser.add_argument("--node-code", default="",
                        help="run the nodes from this source tree instead (e.g. `git archive <commit> p2psched "
                             "server | tar -x -C DIR`), to see what the suite finds in other code")
    args = parser.parse_args(argv)
    try:
        plan = ChaosPlan.load(Path(args.replay)) if args.replay else \
            make_plan(args.seed, args.nodes, args.requests, args.faults, args.rate or None)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    console = Console(width=max(120, Console().width))
    out_dir = Path(args.out or f"out/chaos-seed{plan.seed}")
    console.print(f"[bold]chaos[/]: {plan.num_requests} requests at {plan.rate:g}/s over {plan.num_nodes} nodes, "
                  f"{len(plan.faults)} faults, seed {plan.seed}; schedule (also {out_dir / 'schedule.json'}):")
    print(schedule_text(plan), flush=True)
    node_code = Path(args.node_code) if args.node_code else None
    if node_code is not None and not (node_code / "p2psched" / "server.py").is_file():
        print(f"{parser.prog}: error: --node-code {node_code} has no p2psched/server.py", file=sys.stderr)
        return 2
    result = run_chaos(plan, out_dir, console, node_code)
    console.print(summary_table(result))
    for verdict in result.report.failures[:30]:
        console.print(f"  request {verdict.index}: {verdict.status}: {verdict.detail}", highlight=False,
                      markup=False)
    if len(result.report.failures) > 30:
        console.print(f"  ... and {len(result.report.failures) - 30} more (records.jsonl)")
    for problem in result.log_problems[:20]:
        console.print(f"  log: {problem}", highlight=False, markup=False)
    console.print(f"out: {out_dir}/ (summary.json, schedule.json, faults.json, records.jsonl, timeline.png, logs/); "
                  f"replay: python -m bench.chaos --replay {out_dir / 'schedule.json'}")
    return 0 if result.report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

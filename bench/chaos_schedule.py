"""The chaos suite's plan: a seeded workload and a seeded fault schedule, saved as JSON for replay.

Everything a run does on purpose comes from here, as a function of ``ChaosPlan`` (seed and
sizes): which node each request goes to, its prompt, seed, ``max_tokens`` and send time; and
which fault fires when, for how long. ``--replay schedule.json`` loads the same plan, so a run
is reproduced as far as a multi-process system can be: the same requests at the same times and
the same faults at the same times. What a fault hits is chosen when it fires, from what is
running then ("the node serving a stolen request, two tokens before its end"), so the fault
*log* of each run says what was actually hit.

The cluster is not uniform and its TTL bites: the last node has a shorter context
(``--sim-max-model-len``) and a slower engine (``--sim-decode-step-ms``), so victims must grant it
only what fits, and a request is sent only to a node that can hold it, except the few the load
balancer happens to send to the short node anyway ("door probes": its HTTP door must answer
400). ``--scheduler-ttl`` is shorter than the longest requests run, so a request that starts
in time and then streams (stolen, resumed) past its TTL must still complete; the rate keeps
every request's wait before its first token well under the TTL.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2psched.core.config import SchedulerConfig, SimEngineConfig

SCHEDULE_VERSION = 2
VOCAB = 32000  # the sim engine's default vocabulary
DEFAULT_MAX_MODEL_LEN = SimEngineConfig().max_model_len  # a sim node without --sim-max-model-len
DEFAULT_TTL_S = SchedulerConfig().ttl  # a node without --scheduler-ttl

# Node faults hit the thief running a stolen request, or that request's origin (the victim it was
# stolen from), at a point of the stolen request's life: "prefill" (just stolen: the thief's
# stolen_in, or the victim's stolen_out, has just risen; no token streamed yet), "mid_decode" (a
# third of its tokens in) or "before_last" (one or two tokens left).
KILL_KINDS = ("kill9_thief", "kill9_origin")  # kill -9, then a restart on the same ports
STOP_KINDS = ("sigstop_thief", "sigstop_origin")  # SIGSTOP, then SIGCONT after duration_s
# SIGUSR1: the node's next engine step hangs for its --sim-stall-s while its event loop runs on
# (a wedged accelerator): a thief's heartbeats stop vouching, an origin's own requests wait.
STALL_KINDS = ("engine_stall_thief", "engine_stall_origin")
NODE_KINDS = KILL_KINDS + STOP_KINDS + STALL_KINDS
POINTS = ("prefill", "mid_decode", "before_last")
REDIS_KINDS = ("redis_restart", "redis_flushall")
LINK_KINDS = ("link_delay", "link_cut")  # on one node's proxy: every inbound peer connection
FAULT_KINDS = NODE_KINDS + REDIS_KINDS + LINK_KINDS
# What the schedule cycles through: every node kind at every point, and the others.
VARIANTS: tuple[tuple[str, str], ...] = tuple((k, p) for k in NODE_KINDS for p in POINTS) + tuple(
    (k, "") for k in REDIS_KINDS + LINK_KINDS)

LEASE_TIMEOUT_S = 1.0
# Heartbeats stop one lease timeout into a hung step and the lease lapses one later; the thief's
# own tokens after the stall would renew it, so a stall of 3 lease timeouts leaves the origins
# about one to notice in.
STALL_S = 3 * LEASE_TIMEOUT_S
TTL_S = 8.0  # shorter than the long requests run; far longer than any request waits to start
# Node flags: fast failure detection (like tests/integration/conftest.py FAST), a cost model slow
# enough that stealing pays and prefill takes a while on long prompts, engines that stall on
# SIGUSR1, and a TTL that only a request that never starts can hit.
NODE_ARGS = ["--engine", "sim", "--heartbeat-interval", "0.3", "--lease-timeout", str(LEASE_TIMEOUT_S),
             "--steal-timeout", "0.2", "--scheduler-min-load-score", "2", "--max-num-seqs", "4",
             "--sim-decode-step-ms", "10", "--sim-prefill-ms-per-token", "0.25", "--sim-stall-s", str(STALL_S),
             "--scheduler-ttl", str(TTL_S)]
# The odd node (the last one): a quarter of the others' context and half their speed.
SHORT_MAX_MODEL_LEN = 1024
ODD_NODE_ARGS = ["--sim-max-model-len", str(SHORT_MAX_MODEL_LEN), "--sim-decode-step-ms", "20"]

# The workload: mostly short prompts, a fifth long ones (prefill takes a while), mostly short
# outputs with a tail, and a few requests that run 7-19 s: longer than the TTL when stolen by
# the slow node, or anywhere when too long for it. Prompt + output stays within 1,600 tokens.
# A long request comes last in a client's batch of BATCH requests sent to one node at once, so
# it waits at the back of that node's queue, where thieves take from (a batch leaves at least 2
# queued on a node with 4 free slots: a victim grants from a queue of 2 or more, never its head).
# Batches go to the nodes other than node0: a victim's head waits for the victim's own engine,
# and the busiest node's slots must turn over fast or its head waits out the TTL.
LONG_SHARE = 0.05  # of draws; each long one brings BATCH - 1 short ones
BATCH = 6
RATE_PER_NODE = 1.5  # requests per second: waits before the first token stay far under the TTL
LONG_TAIL_S = 20.0  # long requests are not sent in the last 20 s of the window (the drain stays short)


@dataclass(frozen=True)
class Fault:
    fault_id: int
    at_s: float  # seconds after the first request is due
    kind: str
    point: str = ""  # node kinds: prefill, mid_decode or before_last (see POINTS)
    duration_s: float = 0.0  # stop, Redis outage, cut, or how long a delay lasts; 0 = instant
    delay_ms: float = 0.0  # link_delay only
    node: int | None = None  # link faults: whose proxy; node kinds choose their node when they fire

    @property
    def label(self) -> str:
        """``kind@point`` for node kinds, else the kind: what summaries count by."""
        return f"{self.kind}@{self.point}" if self.point else self.kind


@dataclass(frozen=True)
class RequestSpec:
    index: int
    node: int  # the node the client sends it to (skewed: stealing happens a lot)
    prompt_token_ids: list[int]
    max_tokens: int
    seed: int
    send_at_s: float
    # A door probe: sent to a node whose context it exceeds, on purpose (only there; a 400 is
    # the right answer). Every other request goes only to nodes that can hold it.
    is_door_probe: bool = False

    @property
    def context_tokens(self) -> int:
        return len(self.prompt_token_ids) + self.max_tokens


def _flag(args: list[str], name: str) -> str | None:
    """The value of ``name`` in an argument list (the last one wins, as for argparse)."""
    found = [args[k + 1] for k, arg in enumerate(args[:-1]) if arg == name]
    return found[-1] if found else None


@dataclass(frozen=True)
class ChaosPlan:
    seed: int
    num_nodes: int = 4
    num_requests: int = 600
    num_faults: int = 24
    rate: float = 6.0  # requests per second, all nodes together (Poisson arrivals)
    node_args: list[str] = field(default_factory=lambda: list(NODE_ARGS))
    per_node_args: list[list[str]] = field(default_factory=list)  # empty, or one list per node (after node_args)
    faults: list[Fault] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_nodes < 2:
            raise ValueError("the chaos suite needs at least 2 nodes")
        if self.num_requests < 1 or self.num_faults < 0 or self.rate <= 0:
            raise ValueError("requests >= 1, faults >= 0 and rate > 0, please")
        if "--lease-timeout" not in self.node_args:
            raise ValueError("node_args must set --lease-timeout (stops are drawn around it)")
        if self.per_node_args and len(self.per_node_args) != self.num_nodes:
            raise ValueError(f"per_node_args has {len(self.per_node_args)} entries for {self.num_nodes} nodes")
        if any(f.kind in STALL_KINDS for f in self.faults) and not self.stall_s:
            raise ValueError("engine_stall faults need --sim-stall-s > 0 on every node (SIGUSR1 kills a node "
                             "that does not handle it)")

    def args_of(self, index: int) -> list[str]:
        """Every flag node ``index`` gets (besides ports and names)."""
        return self.node_args + (self.per_node_args[index] if self.per_node_args else [])

    @property
    def lease_timeout(self) -> float:
        return float(self.node_args[self.node_args.index("--lease-timeout") + 1])

    @property
    def ttl_s(self) -> float:
        """The nodes' ``--scheduler-ttl`` (how long a request may wait before it first starts); the
        longest, if they differ: the checker excuses a time-out only after that long."""
        return max(float(_flag(self.args_of(i), "--scheduler-ttl") or DEFAULT_TTL_S) for i in range(self.num_nodes))

    @property
    def stall_s(self) -> float:
        """The shortest ``--sim-stall-s`` of any node (0: some node does not stall on SIGUSR1)."""
        return min(float(_flag(self.args_of(i), "--sim-stall-s") or 0.0) for i in range(self.num_nodes))

    @property
    def contexts(self) -> dict[str, int]:
        """Each node's context length (``--sim-max-model-len``), by node name."""
        return {f"node{i}": int(_flag(self.args_of(i), "--sim-max-model-len") or DEFAULT_MAX_MODEL_LEN)
                for i in range(self.num_nodes)}

    @property
    def send_window_s(self) -> float:
        return self.num_requests / self.rate

    def to_json(self) -> dict[str, Any]:
        return {"version": SCHEDULE_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChaosPlan:
        if data.get("version") != SCHEDULE_VERSION:
            raise ValueError(f"schedule version {data.get('version')!r}; this driver reads {SCHEDULE_VERSION} (the "
                             "workload of another version is generated differently: replay it with that driver)")
        fields = {k: v for k, v in data.items() if k not in ("version", "faults")}
        return cls(**fields, faults=[Fault(**f) for f in data["faults"]])

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> ChaosPlan:
        return cls.from_json(json.loads(path.read_text()))


def make_plan(seed: int, num_nodes: int = 4, num_requests: int = 600, num_faults: int = 24,
              rate: float | None = None, node_args: list[str] | None = None,
              per_node_args: list[list[str]] | None = None) -> ChaosPlan:
    """The default cluster: every node with ``NODE_ARGS``, the last one also with ``ODD_NODE_ARGS``."""
    odd: list[list[str]] = [[] for _ in range(num_nodes - 1)] + [list(ODD_NODE_ARGS)]
    plan = ChaosPlan(seed, num_nodes, num_requests, num_faults, rate or RATE_PER_NODE * num_nodes,
                     list(NODE_ARGS if node_args is None else node_args),
                     odd if per_node_args is None else [list(a) for a in per_node_args])
    return ChaosPlan(**{**asdict(plan), "faults": make_faults(plan)})


def node_weights(num_nodes: int) -> list[float]:
    """Geometric skew: node0 gets about half the traffic, node1 a quarter, and so on."""
    return [2.0 ** -k for k in range(num_nodes)]


def _lengths(rng: random.Random, is_long_allowed: bool) -> tuple[int, int, bool]:
    """(prompt tokens, max_tokens, whether it is one of the long ones) of one request."""
    roll = rng.random()
    if is_long_allowed and roll < LONG_SHARE / 2:  # fits the short node: 7-10 s, or 14-19 s on the slow node
        return rng.randint(20, 120), rng.randint(700, 900), True
    if is_long_allowed and roll < LONG_SHARE:  # too long for the short node: 10-15 s elsewhere
        return rng.randint(100, 200), rng.randint(1000, 1400), True
    prompt_len = rng.randint(8, 200) if rng.random() < 0.8 else rng.randint(400, 1300)
    roll = rng.random()
    max_tokens = rng.randint(8, 64) if roll < 0.7 else rng.randint(64, 160) if roll < 0.95 else rng.randint(160, 320)
    return prompt_len, max_tokens, False


def make_workload(plan: ChaosPlan) -> list[RequestSpec]:
    """Skewed targets, the lengths of ``_lengths``, Poisson arrivals at ``plan.rate`` (a batch
    is sent at one instant, and the gap after it is as long as its requests' gaps together).
    A request drawn for a node too short for it goes to another node that holds it (drawn with
    the same skew), unless it is a door probe: the first such draw for each short node, then
    every third, stays there (expect a 400)."""
    rng = random.Random(f"workload-{plan.seed}")
    weights = node_weights(plan.num_nodes)
    contexts = list(plan.contexts.values())
    long_until = max(plan.send_window_s * 0.25, plan.send_window_s - LONG_TAIL_S)
    misdrawn = [0] * plan.num_nodes
    specs: list[RequestSpec] = []
    at = 0.0
    while len(specs) < plan.num_requests:
        target = rng.choices(range(plan.num_nodes), weights)[0]
        prompt_len, max_tokens, is_long = _lengths(rng, at <= long_until)
        batch = [(prompt_len, max_tokens)]
        if is_long:  # the short ones first: the long one queues behind them
            target = rng.choices(range(1, plan.num_nodes), weights[1:])[0]
            batch = [_lengths(rng, False)[:2] for _ in range(BATCH - 1)] + batch
        for prompt_len, max_tokens in batch[:plan.num_requests - len(specs)]:
            prompt = [rng.randrange(1, VOCAB) for _ in range(prompt_len)]
            node, is_probe = target, False
            if prompt_len + max_tokens > contexts[node]:
                is_probe = misdrawn[node] % 3 == 0
                misdrawn[node] += 1
                if not is_probe:
                    fits = [n for n in range(plan.num_nodes) if prompt_len + max_tokens <= contexts[n]]
                    node = rng.choices(fits, [weights[n] for n in fits])[0]
            specs.append(RequestSpec(len(specs), node, prompt, max_tokens, rng.getrandbits(31), round(at, 4),
                                     is_probe))
        at += sum(rng.expovariate(plan.rate) for _ in batch)
    return specs


def make_faults(plan: ChaosPlan) -> list[Fault]:
    """Every variant (kind and point) in turn, shuffled, at random times spread over the send
    window. Engine stalls only when every node stalls on SIGUSR1 (``--sim-stall-s``)."""
    rng = random.Random(f"faults-{plan.seed}")
    if plan.num_faults == 0:
        return []
    usable = [v for v in VARIANTS if plan.stall_s > 0 or v[0] not in STALL_KINDS]
    variants: list[tuple[str, str]] = []
    while len(variants) < plan.num_faults:
        batch = list(usable)
        rng.shuffle(batch)
        variants += batch
    variants = variants[:plan.num_faults]
    rng.shuffle(variants)
    window = plan.send_window_s
    first, last = min(1.0, window / 4), window * 0.85  # the last faults still find stolen requests to hit
    slot = (last - first) / plan.num_faults  # one fault per slot, jittered inside it
    faults = []
    for k, (kind, point) in enumerate(variants):
        at = first + slot * (k + rng.uniform(0.1, 0.9))
        duration, delay, node = 0.0, 0.0, None
        lease = plan.lease_timeout
        if kind in STOP_KINDS:  # shorter than the lease timeout about half the time, longer otherwise
            duration = rng.uniform(0.2, 0.7) * lease if rng.random() < 0.5 else rng.uniform(1.5, 3.0) * lease
        elif kind in STALL_KINDS:  # the node's own --sim-stall-s decides; recorded for the reader
            duration = plan.stall_s
        elif kind == "redis_restart":
            duration = rng.uniform(0.5, 3.0)
        elif kind == "link_delay":
            delay, duration, node = rng.uniform(1.0, 20.0), rng.uniform(1.0, 4.0), rng.randrange(plan.num_nodes)
        elif kind == "link_cut":
            duration, node = rng.uniform(0.5, 3.0), rng.randrange(plan.num_nodes)
        faults.append(Fault(k, round(at, 3), kind, point, round(duration, 3), round(delay, 1), node))
    return faults

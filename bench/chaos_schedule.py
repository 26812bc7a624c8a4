"""The chaos suite's plan: a seeded workload and a seeded fault schedule, saved as JSON for replay.

Everything a run does on purpose comes from here, as a function of ``ChaosPlan`` (seed and
sizes): which node each request goes to, its prompt, seed, ``max_tokens`` and send time; and
which fault fires when, for how long. ``--replay schedule.json`` loads the same plan, so a run
is reproduced as far as a multi-process system can be: the same requests at the same times and
the same faults at the same times. What a fault hits is chosen when it fires, from what is
running then ("the node serving a stolen request, two tokens before its end"), so the fault
*log* of each run says what was actually hit.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEDULE_VERSION = 1
VOCAB = 32000  # the sim engine's default vocabulary

# Node faults hit the thief running a stolen request, or that request's origin (the victim it was
# stolen from), at a point of the stolen request's life: "prefill" (just stolen: the thief's
# stolen_in, or the victim's stolen_out, has just risen; no token streamed yet), "mid_decode" (a
# third of its tokens in) or "before_last" (one or two tokens left).
KILL_KINDS = ("kill9_thief", "kill9_origin")  # kill -9, then a restart on the same ports
STOP_KINDS = ("sigstop_thief", "sigstop_origin")  # SIGSTOP, then SIGCONT after duration_s
NODE_KINDS = KILL_KINDS + STOP_KINDS
POINTS = ("prefill", "mid_decode", "before_last")
REDIS_KINDS = ("redis_restart", "redis_flushall")
LINK_KINDS = ("link_delay", "link_cut")  # on one node's proxy: every inbound peer connection
FAULT_KINDS = NODE_KINDS + REDIS_KINDS + LINK_KINDS
# What the schedule cycles through: every node kind at every point, and the others.
VARIANTS: tuple[tuple[str, str], ...] = tuple((k, p) for k in NODE_KINDS for p in POINTS) + tuple(
    (k, "") for k in REDIS_KINDS + LINK_KINDS)

# Node flags: fast failure detection (like tests/integration/conftest.py FAST), a cost model slow
# enough that stealing pays and prefill takes a while on long prompts, and a scheduler TTL so
# large that no request ever times out by design.
NODE_ARGS = ["--engine", "sim", "--heartbeat-interval", "0.3", "--lease-timeout", "1.0", "--steal-timeout", "0.2",
             "--scheduler-min-load-score", "2", "--max-num-seqs", "4", "--sim-decode-step-ms", "10",
             "--sim-prefill-ms-per-token", "0.25", "--scheduler-ttl", "3600"]


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


@dataclass(frozen=True)
class ChaosPlan:
    seed: int
    num_nodes: int = 4
    num_requests: int = 600
    num_faults: int = 24
    rate: float = 12.0  # requests per second, all nodes together (Poisson arrivals)
    node_args: list[str] = field(default_factory=lambda: list(NODE_ARGS))
    faults: list[Fault] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_nodes < 2:
            raise ValueError("the chaos suite needs at least 2 nodes")
        if self.num_requests < 1 or self.num_faults < 0 or self.rate <= 0:
            raise ValueError("requests >= 1, faults >= 0 and rate > 0, please")
        if "--lease-timeout" not in self.node_args:
            raise ValueError("node_args must set --lease-timeout (stops are drawn around it)")

    @property
    def lease_timeout(self) -> float:
        return float(self.node_args[self.node_args.index("--lease-timeout") + 1])

    @property
    def send_window_s(self) -> float:
        return self.num_requests / self.rate

    def to_json(self) -> dict[str, Any]:
        return {"version": SCHEDULE_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChaosPlan:
        if data.get("version") != SCHEDULE_VERSION:
            raise ValueError(f"schedule version {data.get('version')!r}; this driver reads {SCHEDULE_VERSION}")
        fields = {k: v for k, v in data.items() if k not in ("version", "faults")}
        return cls(**fields, faults=[Fault(**f) for f in data["faults"]])

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> ChaosPlan:
        return cls.from_json(json.loads(path.read_text()))


def make_plan(seed: int, num_nodes: int = 4, num_requests: int = 600, num_faults: int = 24,
              rate: float | None = None, node_args: list[str] | None = None) -> ChaosPlan:
    plan = ChaosPlan(seed, num_nodes, num_requests, num_faults, rate or 3.0 * num_nodes,
                     list(NODE_ARGS if node_args is None else node_args))
    return ChaosPlan(**{**asdict(plan), "faults": make_faults(plan)})


def node_weights(num_nodes: int) -> list[float]:
    """Geometric skew: node0 gets about half the traffic, node1 a quarter, and so on."""
    return [2.0 ** -k for k in range(num_nodes)]


def make_workload(plan: ChaosPlan) -> list[RequestSpec]:
    """Skewed targets, mostly short prompts with some long ones (prefill takes a while), mostly
    short outputs with a tail; Poisson arrivals at ``plan.rate``."""
    rng = random.Random(f"workload-{plan.seed}")
    weights = node_weights(plan.num_nodes)
    specs: list[RequestSpec] = []
    at = 0.0
    for i in range(plan.num_requests):
        node = rng.choices(range(plan.num_nodes), weights)[0]
        prompt_len = rng.randint(8, 200) if rng.random() < 0.8 else rng.randint(400, 1500)
        roll = rng.random()
        max_tokens = rng.randint(8, 64) if roll < 0.7 else rng.randint(64, 160) if roll < 0.95 else rng.randint(160, 320)
        prompt = [rng.randrange(1, VOCAB) for _ in range(prompt_len)]
        specs.append(RequestSpec(i, node, prompt, max_tokens, rng.getrandbits(31), round(at, 4)))
        at += rng.expovariate(plan.rate)
    return specs


def make_faults(plan: ChaosPlan) -> list[Fault]:
    """Every variant (kind and point) in turn, shuffled, at random times spread over the send window."""
    rng = random.Random(f"faults-{plan.seed}")
    if plan.num_faults == 0:
        return []
    variants: list[tuple[str, str]] = []
    while len(variants) < plan.num_faults:
        batch = list(VARIANTS)
        rng.shuffle(batch)
        variants += batch
    variants = variants[:plan.num_faults]
    rng.shuffle(variants)
    window = plan.send_window_s
    first, last = min(1.0, window / 4), max(window - 0.5, window * 0.9)
    slot = (last - first) / plan.num_faults  # one fault per slot, jittered inside it
    faults = []
    for k, (kind, point) in enumerate(variants):
        at = first + slot * (k + rng.uniform(0.1, 0.9))
        duration, delay, node = 0.0, 0.0, None
        lease = plan.lease_timeout
        if kind in STOP_KINDS:  # shorter than the lease timeout about half the time, longer otherwise
            duration = rng.uniform(0.2, 0.7) * lease if rng.random() < 0.5 else rng.uniform(1.5, 3.0) * lease
        elif kind == "redis_restart":
            duration = rng.uniform(0.5, 3.0)
        elif kind == "link_delay":
            delay, duration, node = rng.uniform(1.0, 20.0), rng.uniform(1.0, 4.0), rng.randrange(plan.num_nodes)
        elif kind == "link_cut":
            duration, node = rng.uniform(0.5, 3.0), rng.randrange(plan.num_nodes)
        faults.append(Fault(k, round(at, 3), kind, point, round(duration, 3), round(delay, 1), node))
    return faults

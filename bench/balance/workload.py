"""Seeded, reproducible workloads for the balance bench: when each request arrives, where the
front door sends it, how long its prompt is and how many tokens it asks for.

The same ``WorkloadSpec`` gives the same items on every machine and in every mode (real
processes or the simulator): arrivals and lengths come from one ``random.Random(seed)``, drawn
in a fixed order. Rates are set as a fraction of a capacity (requests per second the cluster can
sustain), which the caller measures or computes from the sim engine's cost model
(``sim_capacity_rps``).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Literal

from p2psched.core.config import SimEngineConfig

Arrival = Literal["poisson", "gamma", "steady"]
Target = Literal["round_robin", "one_node"]


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 300
    rate_rps: float = 10.0  # mean arrivals per second, all nodes together
    arrival: Arrival = "poisson"
    gamma_shape: float = 0.25  # "gamma": interarrival shape k; squared coefficient of variation 1/k (bursty < 1)
    output_alpha: float = 1.3  # output tokens: scale x Pareto(alpha), capped
    output_scale: float = 16.0
    output_cap: int = 600
    prompt_min: int = 16  # prompt tokens: uniform in [min, max] ...
    prompt_max: int = 64
    long_prompt_fraction: float = 0.0  # ... except this share, uniform in the long range
    long_prompt_min: int = 1024
    long_prompt_max: int = 2048
    target: Target = "round_robin"
    seed: int = 1
    # membership changes, at a request's index (the same for every rate): from ``join_at`` on, one
    # more node (index = the cluster's node count) is in the front door's rotation; from
    # ``leave_at`` on, node ``leaver`` is out of it (it drains what it has and leaves)
    join_at: int | None = None
    leave_at: int | None = None
    leaver: int = 1

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.rate_rps <= 0:
            raise ValueError("a workload needs at least one request and a positive rate")
        if not (0 < self.prompt_min <= self.prompt_max and 0 <= self.long_prompt_fraction <= 1):
            raise ValueError("prompt lengths: 0 < min <= max, long fraction in [0, 1]")
        if self.output_alpha <= 1 or self.output_scale < 1 or self.output_cap < 1 or self.gamma_shape <= 0:
            raise ValueError("output lengths: alpha > 1, scale >= 1, cap >= 1; gamma shape > 0")
        for at in (self.join_at, self.leave_at):
            if at is not None and not 0 < at < self.num_requests:
                raise ValueError("join_at and leave_at are request indexes inside the run")
        if self.leave_at is not None and self.target == "one_node" and self.leaver == 0:
            raise ValueError("the node every request goes to cannot leave")

    def at_rate(self, rate_rps: float) -> WorkloadSpec:
        return dataclasses.replace(self, rate_rps=rate_rps)

    @property
    def mean_output_tokens(self) -> float:
        """Mean of min(cap, floor(scale x Pareto(alpha))), by numeric summation of its tail."""
        total = 0.0
        for n in range(1, self.output_cap + 1):  # E[X] = sum over n >= 1 of P(X >= n)
            total += 1.0 if n <= self.output_scale else (self.output_scale / n) ** self.output_alpha
        return total

    @property
    def mean_prompt_tokens(self) -> float:
        short = (self.prompt_min + self.prompt_max) / 2
        long = (self.long_prompt_min + self.long_prompt_max) / 2
        return (1 - self.long_prompt_fraction) * short + self.long_prompt_fraction * long


@dataclass(frozen=True)
class Item:
    index: int
    arrival_s: float  # after the start of the run
    node: int  # the front door's choice
    prompt_tokens: int
    max_tokens: int

    @property
    def seed(self) -> int:
        return self.index


def membership(spec: WorkloadSpec, num_nodes: int, index: int) -> list[int]:
    """The nodes in the front door's rotation when request ``index`` arrives."""
    live = list(range(num_nodes))
    if spec.leave_at is not None and index >= spec.leave_at:
        live.remove(spec.leaver)
    if spec.join_at is not None and index >= spec.join_at:
        live.append(num_nodes)
    return live


def total_nodes(spec: WorkloadSpec, num_nodes: int) -> int:
    """Node processes the run needs: ``num_nodes``, and one more when a node joins."""
    return num_nodes + (spec.join_at is not None)


def generate(spec: WorkloadSpec, num_nodes: int) -> list[Item]:
    """The items of ``spec`` for a cluster of ``num_nodes`` (round-robin, like nginx's default:
    each request to the next node in rotation after the previous request's, see ``membership``)."""
    if num_nodes < 1 or (spec.leave_at is not None and not 0 <= spec.leaver < num_nodes):
        raise ValueError("at least one node, and the leaver one of them")
    if spec.leave_at is not None and spec.join_at is None and num_nodes < 2:
        raise ValueError("the only node cannot leave")
    rng = random.Random(spec.seed)
    items: list[Item] = []
    t = 0.0
    last = -1  # the node the previous request went to
    for i in range(spec.num_requests):
        if i > 0:
            t += _gap(rng, spec)
        if rng.random() < spec.long_prompt_fraction:
            prompt = rng.randint(spec.long_prompt_min, spec.long_prompt_max)
        else:
            prompt = rng.randint(spec.prompt_min, spec.prompt_max)
        output = min(spec.output_cap, max(1, int(spec.output_scale * rng.paretovariate(spec.output_alpha))))
        if spec.target == "round_robin":
            live = membership(spec, num_nodes, i)  # sorted: the next in rotation after the last one
            node = next((n for n in live if n > last), live[0])
            last = node
        else:
            node = 0
        items.append(Item(i, t, node, prompt, output))
    return items


def _gap(rng: random.Random, spec: WorkloadSpec) -> float:
    mean = 1.0 / spec.rate_rps
    if spec.arrival == "poisson":
        return rng.expovariate(spec.rate_rps)
    if spec.arrival == "gamma":
        return rng.gammavariate(spec.gamma_shape, mean / spec.gamma_shape)
    return mean


def prompt_ids(item: Item, vocab_size: int = 32000) -> list[int]:
    """A prompt of ``item.prompt_tokens`` token ids, distinct per request (for the simulator)."""
    return [(item.index * 7919 + k * 104729) % (vocab_size - 1) + 1 for k in range(item.prompt_tokens)]


def sim_capacity_rps(cost: SimEngineConfig, max_num_seqs: int, spec: WorkloadSpec, num_nodes: int,
                     slowdowns: tuple[float, ...] = ()) -> float:
    """Requests per second the cluster sustains with full batches, from the sim engine's cost
    model: a request's decode steps are shared with ``max_num_seqs - 1`` others; its prefill
    lengthens one step of the whole batch."""
    context = max_num_seqs * (spec.mean_prompt_tokens + spec.mean_output_tokens / 2)
    step_ms = cost.decode_step_ms + cost.decode_ms_per_seq * max_num_seqs + cost.decode_ms_per_kilotoken * context / 1000
    node_s_per_request = (spec.mean_output_tokens * step_ms / max_num_seqs
                          + spec.mean_prompt_tokens * cost.prefill_ms_per_token) / 1000
    return sum(1.0 / (node_s_per_request * (slowdowns[n] if n < len(slowdowns) else 1.0)) for n in range(num_nodes))

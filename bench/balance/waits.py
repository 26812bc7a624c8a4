"""Where a simulated run's waits went: one ``WaitRecord`` per request (the simulator fills them
from the real core's events, ``simulate.SimCluster``), and ``decompose`` / ``format_decomposition``
to say what the TTFT of stolen requests, of all requests and of the slowest 1% was made of
(``python -m bench.balance.simulate --decompose``). Pure: no clock, no simulator state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .metrics import percentile


@dataclass(frozen=True)
class WaitRecord:
    """Where one request's time to first token went (seconds; None where it does not apply).

    Every started request: ``wait_s`` (arrival -> start of the step that produced its first
    token) = ``queued_s`` (arrival -> admitted into the slot it started in) + ``step_wait_s``
    (-> that node's step in progress ended and the next began); TTFT = ``wait_s`` +
    ``first_step_s`` + ``delivery_s`` (engine -> client: a stolen request's token travels to its
    origin).

    A stolen request (taken by a ``Steal``): TTFT = ``unnoticed_s`` (arrival -> the first moment a
    peer heard a report of the origin's queue made after it arrived: a probe's answer or a grant;
    never later than the steal that took it, which acted on what its thief knew) + ``decide_s``
    (-> that steal was sent) + ``round_trip_s`` (-> its grant, of ``grant_size`` tasks, reached the
    thief) + ``to_first_token_s`` (-> the thief's engine produced its first token) + ``delivery_s``.

    ``idle_slot_wait_s``: the part of ``queued_s`` during which some live node (joined, not
    draining) had a free slot: fewer requests admitted than ``max_num_seqs``
    (``Scheduler.free_slots`` > 0: an admitted request holds its slot from admission, while it
    waits for the step in progress to end, since no other request can take it) and nothing queued
    (a queue beside a free slot means its head waits for KV room: that slot is not idle for want of
    work). Once a request holds a slot, the rest of its wait (``step_wait_s``, at most a step) is
    the batching's, which a pooled queue pays too: it is not counted, so the oracle's is 0.
    """

    index: int
    origin: str
    served_by: str
    arrival_s: float
    started_s: float | None  # its first step began (items' clock)
    ttft_s: float | None
    wait_s: float | None
    queued_s: float | None
    step_wait_s: float | None
    first_step_s: float | None
    delivery_s: float | None
    idle_slot_wait_s: float
    unnoticed_s: float | None = None
    decide_s: float | None = None
    round_trip_s: float | None = None
    grant_size: int = 0
    to_first_token_s: float | None = None

    @property
    def is_stolen(self) -> bool:
        return self.round_trip_s is not None

    @property
    def thief_queued_s(self) -> float | None:
        """A stolen request's wait in its thief's queue for a slot: the first part of ``to_first_token_s``."""
        if self.queued_s is None or self.unnoticed_s is None or self.decide_s is None or self.round_trip_s is None:
            return None
        return self.queued_s - self.unnoticed_s - self.decide_s - self.round_trip_s



STEAL_PARTS = ("unnoticed_s", "decide_s", "round_trip_s", "to_first_token_s", "delivery_s")  # a stolen request's TTFT
LOCAL_PARTS = ("queued_s", "step_wait_s", "first_step_s", "delivery_s")  # any other's
PARTS = tuple(dict.fromkeys(STEAL_PARTS + LOCAL_PARTS))
TAIL_SHARE = 0.01  # the slowest 1% by TTFT
IDLE_EPSILON_S = 1e-9  # an idle-slot wait below this is the clock's rounding, not a wait


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _parts(waits: list[WaitRecord]) -> dict[str, float]:
    """Each part's mean over ``waits``, counting 0 where a part does not apply (a stolen request
    has no local queueing, a local one no steal): the parts' means add up to the mean TTFT."""
    totals = dict.fromkeys(PARTS, 0.0)
    for wait in waits:
        for name in STEAL_PARTS if wait.is_stolen else LOCAL_PARTS:
            totals[name] += getattr(wait, name)
    return {name: total / len(waits) if waits else math.nan for name, total in totals.items()}


def overtaken(waits: list[WaitRecord]) -> dict[int, int]:
    """Per started request (by index): how many younger requests took a slot before it did. A
    pooled queue starts them in arrival order (0 for all); per-node queues do not. O(n log n)."""
    started = [w for w in waits if w.queued_s is not None]
    ranks = {a: r for r, a in enumerate(sorted({w.arrival_s for w in started}), start=1)}
    tree = [0] * (len(ranks) + 1)  # a Fenwick tree over arrival ranks: slots taken so far
    out: dict[int, int] = {}
    for taken, w in enumerate(sorted(started, key=lambda w: (w.arrival_s + (w.queued_s or 0.0), w.arrival_s))):
        rank, older = ranks[w.arrival_s], 0
        while rank > 0:  # those that took a slot before it and arrived no later than it did
            older += tree[rank]
            rank -= rank & -rank
        out[w.index] = taken - older
        rank = ranks[w.arrival_s]
        while rank < len(tree):
            tree[rank] += 1
            rank += rank & -rank
    return out


def decompose(mode: str, waits: list[WaitRecord]) -> dict[str, Any]:
    """What a run's waits were made of (seconds), from its ``WaitRecord``s (``RunResult.waits``):

    - ``stolen``: how many requests a steal took, and each part of their TTFT (``STEAL_PARTS``;
      and of ``to_first_token_s``, the wait in the thief's queue), their grant sizes, idle-slot
      waits and the younger requests that took a slot before them (``overtaken``), at mean and p99;
    - ``all`` and ``tail`` (the slowest ``TAIL_SHARE`` by TTFT, at least one): the mean of each
      part over those requests (``_parts``: stolen ones by ``STEAL_PARTS``, the others by
      ``LOCAL_PARTS``; the means add up to the mean TTFT), and their mean idle-slot wait and
      overtaking;
    - ``idle_slot``: the requests that waited while some node had a free slot, with the mean, p99
      and sum of those waits.
    """
    started = [w for w in waits if w.ttft_s is not None and w.wait_s is not None]
    stolen = [w for w in started if w.is_stolen]
    tail = sorted(started, key=lambda w: (-(w.ttft_s or 0.0), w.index))[:max(1, math.ceil(TAIL_SHARE * len(started)))]
    passed = overtaken(started)

    def dist(values: list[float]) -> dict[str, float]:
        return {"mean": _mean(values), "p99": percentile(values, 99)}

    def group(waits: list[WaitRecord]) -> dict[str, Any]:
        return {"count": len(waits), "stolen": sum(1 for w in waits if w.is_stolen),
                "ttft_s": _mean([w.ttft_s or 0.0 for w in waits]), "parts": _parts(waits),
                "thief_queued_s": _mean([w.thief_queued_s or 0.0 for w in waits]),
                "idle_slot_wait_s": _mean([w.idle_slot_wait_s for w in waits]),
                "grant_size": _mean([float(w.grant_size) for w in waits if w.is_stolen]),
                "overtaken": _mean([float(passed[w.index]) for w in waits])}

    idle = [w.idle_slot_wait_s for w in waits if w.idle_slot_wait_s > IDLE_EPSILON_S]
    return {
        "mode": mode,
        "requests": len(waits),
        "started": len(started),
        "stolen": {"count": len(stolen),
                   **{name: dist([getattr(w, name) for w in stolen])
                      for name in (*STEAL_PARTS, "thief_queued_s", "ttft_s", "grant_size", "idle_slot_wait_s")},
                   "overtaken": dist([float(passed[w.index]) for w in stolen])},
        "all": group(started),
        "tail": group(tail) if started else group([]),
        "idle_slot": {"count": len(idle), "mean_s": _mean(idle), "p99_s": percentile(idle, 99), "sum_s": sum(idle)},
    }


def format_decomposition(d: dict[str, Any]) -> list[str]:
    """``decompose``'s answer as two markdown tables (milliseconds): where TTFT went, for stolen
    requests (mean, p99), all requests and the slowest 1% (means); then the waits beside a free slot."""
    def ms(x: float) -> str:
        return "–" if math.isnan(x) else f"{1000 * x:.1f}"

    stolen, every, tail = d["stolen"], d["all"], d["tail"]
    rows = [("unnoticed: queued before any peer heard of it", "unnoticed_s"),
            ("decide: heard of -> steal sent", "decide_s"),
            ("steal round trip", "round_trip_s"),
            ("on the thief: grant -> first token", "to_first_token_s"),
            ("(of which queued on the thief for a slot)", "thief_queued_s"),
            ("not stolen: queued for a slot", "queued_s"),
            ("not stolen: slot -> its first step", "step_wait_s"),
            ("not stolen: first step", "first_step_s"),
            ("delivery to the client", "delivery_s")]
    header = (f"| {d['mode']}: TTFT, where it went (ms) | stolen (n={stolen['count']}) mean | stolen p99 "
              f"| all (n={every['count']}) mean | slowest 1% (n={tail['count']}, {tail['stolen']} stolen) mean |")
    lines = [header, "|---|---|---|---|---|"]
    for label, name in rows:
        cells = (ms(stolen[name]["mean"]), ms(stolen[name]["p99"])) if name in stolen else ("–", "–")
        means = (every[name], tail[name]) if name == "thief_queued_s" else (every["parts"][name], tail["parts"][name])
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {ms(means[0])} | {ms(means[1])} |")
    lines.append(f"| = TTFT | {ms(stolen['ttft_s']['mean'])} | {ms(stolen['ttft_s']['p99'])} | {ms(every['ttft_s'])} "
                 f"| {ms(tail['ttft_s'])} |")
    lines.append(f"| waited beside a free slot (overlaps the above) | {ms(stolen['idle_slot_wait_s']['mean'])} "
                 f"| {ms(stolen['idle_slot_wait_s']['p99'])} | {ms(every['idle_slot_wait_s'])} "
                 f"| {ms(tail['idle_slot_wait_s'])} |")

    def size(x: float) -> str:
        return "–" if math.isnan(x) else f"{x:.2f}"

    lines.append(f"| grant size (tasks) | {size(stolen['grant_size']['mean'])} | {size(stolen['grant_size']['p99'])} "
                 f"| {size(every['grant_size'])} | {size(tail['grant_size'])} |")
    lines.append(f"| younger requests that took a slot first | {size(stolen['overtaken']['mean'])} "
                 f"| {size(stolen['overtaken']['p99'])} | {size(every['overtaken'])} | {size(tail['overtaken'])} |")
    idle = d["idle_slot"]
    row = (f"| more than {IDLE_EPSILON_S * 1e9:.0f} ns | {idle['count']} of {d['requests']} | {ms(idle['mean_s'])} "
           f"| {ms(idle['p99_s'])} | {idle['sum_s']:.3f} |")
    lines += ["", f"| {d['mode']}: waited beside a free slot | requests | mean ms | p99 ms | total s |",
              "|---|---|---|---|---|", row]
    return lines

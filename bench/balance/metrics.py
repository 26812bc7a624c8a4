"""What a balance run measured, named as ``vllm bench serve`` names it.

One ``RequestRecord`` per request, as its client saw it (times in seconds after the run's start;
token times at the origin, so a forwarded token's extra hop is in them). ``summarize`` turns a
run's records into TTFT, TPOT, ITL and E2EL at mean/p50/p90/p99, request and token rates,
goodput under an SLO, and the makespan. Percentiles are linear interpolation between order
statistics (numpy's default), so a short trace gives the numbers a spreadsheet would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    index: int
    arrival_s: float
    origin: str  # the node the front door chose
    served_by: str = ""  # the node whose engine ran it ("" if it never ran)
    token_times: list[float] = field(default_factory=list)  # one per streamed chunk, at the origin
    num_tokens: int = 0
    finish_s: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_s is not None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival_s if self.token_times else None

    @property
    def e2el(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first."""
        if not self.ok or self.num_tokens < 2 or not self.token_times:
            return None
        assert self.finish_s is not None
        return (self.finish_s - self.token_times[0]) / (self.num_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


@dataclass(frozen=True)
class Slo:
    ttft_s: float = 1.0
    tpot_s: float = 0.1


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: list[float]) -> dict[str, float]:
    out = {"mean": sum(values) / len(values) if values else math.nan}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q)
    return out


def summarize(records: list[RequestRecord], slo: Slo = Slo()) -> dict[str, Any]:
    """The run's headline numbers (times in seconds)."""
    done = [r for r in records if r.ok]
    start = min((r.arrival_s for r in records), default=0.0)
    end = max((r.finish_s for r in done if r.finish_s is not None), default=start)
    makespan = end - start
    tokens = sum(r.num_tokens for r in done)
    good = [r for r in done if (r.ttft or 0.0) <= slo.ttft_s and (r.tpot is None or r.tpot <= slo.tpot_s)]
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "makespan_s": makespan,
        "request_throughput": len(done) / makespan if makespan > 0 else math.nan,
        "output_throughput": tokens / makespan if makespan > 0 else math.nan,
        "goodput": len(good) / makespan if makespan > 0 else math.nan,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "ttft": distribution([r.ttft for r in done if r.ttft is not None]),
        "tpot": distribution([t for r in done if (t := r.tpot) is not None]),
        "itl": distribution([gap for r in done for gap in r.itls]),
        "e2el": distribution([r.e2el for r in done if r.e2el is not None]),
        "served_elsewhere": sum(1 for r in done if r.served_by and r.served_by != r.origin),
    }


def idle_slot_waits(records: list[RequestRecord], max_num_seqs: int, step_s: float,
                    live: dict[str, tuple[float, float]] | None = None) -> dict[int, float]:
    """Per completed request (by index): how long it waited while some node had a free slot, read
    off the trace alone. A request holds a slot on the node that ran it from one step before its
    first token to its last; a node counts only while it is live (``live``: node -> (from, to),
    default every node that ran something, for the whole run). Waiting is from arrival to the
    start of its first step. The oracle's is zero but for the trace's own blur (a step or so)."""
    done = [r for r in records if r.ok and r.token_times and r.served_by]
    nodes = sorted({r.served_by for r in done} | set(live or {}))
    windows = {n: (live or {}).get(n, (-math.inf, math.inf)) for n in nodes}
    events: list[tuple[float, int, str]] = []  # (time, +1 taken / -1 freed, node)
    for r in done:
        assert r.finish_s is not None
        events.append((r.token_times[0] - step_s, 1, r.served_by))
        events.append((r.finish_s, -1, r.served_by))
    for node, (start, end) in windows.items():  # a node's arrival and departure change who counts
        for t in (start, end):
            if math.isfinite(t):
                events.append((t, 0, node))
    events.sort(key=lambda e: (e[0], e[1]))  # at one instant, frees before takes
    busy = dict.fromkeys(nodes, 0)
    free_from: float | None = None  # start of the current stretch with a free slot somewhere
    stretches: list[tuple[float, float]] = []
    for t, delta, node in events:
        busy[node] += delta
        is_free = any(busy[n] < max_num_seqs and windows[n][0] <= t < windows[n][1] for n in nodes)
        if is_free and free_from is None:
            free_from = t
        elif not is_free and free_from is not None:
            stretches.append((free_from, t))
            free_from = None
    if free_from is not None:
        stretches.append((free_from, math.inf))
    out = {}
    for r in done:
        lo, hi = r.arrival_s, r.token_times[0] - step_s
        out[r.index] = sum(max(0.0, min(hi, b) - max(lo, a)) for a, b in stretches)
    return out

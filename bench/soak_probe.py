"""What the soak samples: a process tree's memory and open files (from /proc), a node's gauges
(its Prometheus ``/metrics``) and counters (``/stats``), and the time series they make.

A node's figures cover its process and every descendant, so they stay whole if the engine moves
into a child process (DESIGN §3). RSS is summed over the tree (shared pages count once per
process); only its change over time is judged, not its level.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

GAUGES = ("p2psched_requests_in_flight", "p2psched_leases_held", "p2psched_stolen_in_active",
          "p2psched_scheduler_requests", "p2psched_queue_length", "p2psched_running_sequences")
COUNTERS = ("received", "completed", "failed", "cancelled", "rejected", "stolen_in", "stolen_out",
            "steals_attempted", "steals_granted", "resumed", "lease_expiries", "stream_gaps", "origin_losses",
            "sends_failed")


@dataclass(frozen=True)
class ProcSample:
    rss_kib: int
    num_fds: int
    num_procs: int


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += _children(p)
    return tree


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0  # a zombie has no VmRSS line


def sample_process(pid: int) -> ProcSample | None:
    """RSS and open fds of ``pid`` and its descendants; None when ``pid`` is gone."""
    rss = fds = procs = 0
    for p in process_tree(pid):
        try:
            rss += _rss_kib(p)
            fds += len(os.listdir(f"/proc/{p}/fd"))
            procs += 1
        except FileNotFoundError:
            if p == pid:
                return None  # a descendant may exit between listing and reading; that is fine
    return ProcSample(rss, fds, procs)


def parse_gauges(text: str) -> dict[str, float]:
    """The soak's gauges from a Prometheus text exposition (one node: one sample each)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in GAUGES:
            values[family.name] = sum(s.value for s in family.samples)
    return values


async def scrape(session: aiohttp.ClientSession, url: str) -> tuple[dict[str, float], dict[str, int]]:
    """A node's gauges (``/metrics``) and counters (``/stats``)."""
    async with session.get(url + "/metrics") as resp:
        gauges = parse_gauges(await resp.text())
    async with session.get(url + "/stats") as resp:
        stats: dict[str, Any] = (await resp.json())["stats"]
    return gauges, {name: int(stats.get(name, 0)) for name in COUNTERS}


@dataclass
class Series:
    """One process's time series; ``t`` in seconds since the load started (negative before)."""

    t: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    num_fds: list[int] = field(default_factory=list)
    gauges: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in GAUGES})
    counters: dict[str, list[int]] = field(default_factory=lambda: {name: [] for name in COUNTERS})

    def add(self, t: float, proc: ProcSample, gauges: dict[str, float] | None = None,
            counters: dict[str, int] | None = None) -> None:
        self.t.append(round(t, 3))
        self.rss_kib.append(proc.rss_kib)
        self.num_fds.append(proc.num_fds)
        if gauges is not None:
            for name in GAUGES:
                self.gauges[name].append(gauges.get(name, float("nan")))
        if counters is not None:
            for name in COUNTERS:
                self.counters[name].append(counters[name])

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": self.t, "rss_kib": self.rss_kib, "num_fds": self.num_fds}
        if any(self.gauges.values()):
            out["gauges"] = self.gauges
            out["counters"] = self.counters
        return out

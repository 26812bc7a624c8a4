"""The soak's verdict (pure: series in, checks out), its table, its JSON and its plot.

Growth is judged on medians, not on single samples: after a warm-up (allocators, connection
pools and caches settle), the rest of the run is cut into quarters and the median of the last
quarter is compared with the median of the first. A leak shows as a steady climb that moves
the median; a burst of load or a garbage collection at one instant does not.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from .soak_load import LoadResult
from .soak_probe import GAUGES, Series


@dataclass(frozen=True)
class Limits:
    warmup_s: float  # samples before this (seconds after the load started) are not judged
    max_rss_growth_mib: float = 8.0  # per process, median of the last quarter minus the first
    max_fd_growth: int = 4  # per process, same medians
    max_fd_leftover: int = 2  # open fds after quiesce minus before the load


@dataclass(frozen=True)
class Growth:
    first: float  # median of the first quarter after the warm-up
    last: float  # median of the last quarter
    num_samples: int  # in each quarter (the smaller)

    @property
    def delta(self) -> float:
        return self.last - self.first


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def growth(t: Sequence[float], values: Sequence[float], warmup_s: float, end_s: float) -> Growth | None:
    """Medians of the first and last quarter of the samples in [warmup_s, end_s); None if either is empty."""
    window = [v for ti, v in zip(t, values) if warmup_s <= ti < end_s]
    quarter = len(window) // 4
    if quarter == 0:
        return None
    return Growth(statistics.median(window[:quarter]), statistics.median(window[-quarter:]), quarter)


def growth_checks(name: str, series: Series, limits: Limits, end_s: float) -> list[Check]:
    checks = []
    rss = growth(series.t, [v / 1024 for v in series.rss_kib], limits.warmup_s, end_s)
    fds = growth(series.t, series.num_fds, limits.warmup_s, end_s)
    if rss is None or fds is None:
        return [Check(f"{name}: growth", False, "too few samples after the warm-up to judge growth")]
    checks.append(Check(f"{name}: RSS growth", rss.delta <= limits.max_rss_growth_mib,
                        f"{rss.first:.1f} -> {rss.last:.1f} MiB ({rss.delta:+.1f}; limit +{limits.max_rss_growth_mib:g}; "
                        f"medians of {rss.num_samples} samples)"))
    checks.append(Check(f"{name}: fd growth", fds.delta <= limits.max_fd_growth,
                        f"{fds.first:g} -> {fds.last:g} ({fds.delta:+g}; limit +{limits.max_fd_growth})"))
    return checks


def node_end_checks(name: str, series: Series, fds_before: int, fds_after: int, gauges_after: dict[str, float],
                    counters_after: dict[str, int], limits: Limits) -> list[Check]:
    """After quiesce: nothing held, every accepted request answered, no connection left open."""
    busy = {g: v for g, v in gauges_after.items() if v != 0}
    missing = [g for g in GAUGES if g not in gauges_after]
    c = counters_after
    answered = c["completed"] + c["cancelled"] + c["failed"]
    return [
        Check(f"{name}: gauges 0 after quiesce", not busy and not missing,
              "all 0" if not busy and not missing else f"non-zero {busy}, missing {missing}"),
        Check(f"{name}: requests answered", c["received"] == answered and c["failed"] == 0 and c["rejected"] == 0,
              f"received {c['received']}, completed {c['completed']}, cancelled {c['cancelled']}, "
              f"failed {c['failed']}, rejected {c['rejected']}"),
        Check(f"{name}: fds after quiesce", fds_after - fds_before <= limits.max_fd_leftover,
              f"{fds_before} before the load, {fds_after} after quiesce (limit +{limits.max_fd_leftover})"),
    ]


def client_checks(load: LoadResult, problems: list[str]) -> list[Check]:
    tallies = list(load.tallies.values())
    sent, completed = sum(t.sent for t in tallies), sum(t.completed for t in tallies)
    hung_up, errors = sum(t.hung_up for t in tallies), sum(t.errors for t in tallies)
    return [
        Check("clients: every request completed or hung up", sent == completed + hung_up and sent > 0,
              f"sent {sent}, completed {completed}, hung up {hung_up}, errors {errors}"),
        Check("clients: no errors", errors == 0, "; ".join(load.error_samples[:3]) or "none"),
        Check("run: no problems", not problems, "; ".join(problems) or "none"),
    ]


# A client that hangs up while its stream is being written can make the node's write fail before
# aiohttp cancels the handler; aiohttp then logs the ClientConnectionResetError at ERROR. The node
# still cancels the request (the soak checks that), so the record is counted apart, not judged.
_RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ")


def log_records(text: str) -> list[tuple[str, str]]:
    """(level, text) per log record; a traceback belongs to the record above it ("" before the first)."""
    records: list[tuple[str, list[str]]] = [("", [])]
    for line in text.splitlines():
        match = _RECORD_START.match(line)
        if match:
            records.append((match.group(1), [line]))
        else:
            records[-1][1].append(line)
    return [(level, "\n".join(lines)) for level, lines in records if lines]


def _is_error(level: str, text: str) -> bool:
    return level in ("ERROR", "CRITICAL") or "Traceback" in text


def log_checks(logs: dict[str, str]) -> list[Check]:
    """No node logged an error or a traceback under load or while quiescing."""
    checks = []
    for name, log in logs.items():
        records = log_records(log)
        errors = [text for level, text in records if _is_error(level, text)]
        warnings = [text for level, text in records if level == "WARNING"]
        first = (errors or warnings or [""])[0].splitlines()[:1]
        checks.append(Check(f"{name}: log", not errors,
                            f"{len(errors)} errors, {len(warnings)} warnings"
                            + (f"; first: {first[0][:160]}" if first else "")))
    return checks


def shutdown_notes(logs: dict[str, str], exit_codes: dict[str, int | None]) -> list[str]:
    """What the nodes logged once stopped after the soak, and exit codes other than 0: reported, not judged."""
    notes = []
    for name, log in logs.items():
        if exit_codes[name] != 0:
            notes.append(f"{name}'s exit code: {exit_codes[name]}")
        for level, text in log_records(log):
            if _is_error(level, text):
                lines = text.strip().splitlines()
                notes.append(f"{name} logged while shutting down: {lines[0][:100]} ... {lines[-1][:160]}")
    return notes


def render_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="soak: per process (RSS MiB, open fds; start = before the load, end = after quiesce)")
    columns = ("process", "RSS start", "RSS end", "RSS max", "fds start", "fds end", "fds max", "completed",
               "hung up", "errors", "stolen in", "stolen out", "steals tried")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    return table


def checks_table(checks: list[Check]) -> Table:
    table = Table(title="soak: verdict")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    for check in checks:
        table.add_row(check.name, "[green]ok[/]" if check.ok else "[red]FAIL[/]", check.detail)
    return table


def plot(series: dict[str, Series], done_at: list[float], duration_s: float, warmup_s: float, title: str,
         out: Path) -> None:
    """Three panels over time: RSS change and open fds per process; completed and stolen requests/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    for name, s in series.items():
        style = {"linestyle": "--", "color": "0.4"} if name == "redis" else {}
        base = s.rss_kib[0]
        axes[0].plot(s.t, [(v - base) / 1024 for v in s.rss_kib], label=f"{name} ({base / 1024:.0f} MiB at start)",
                     **style)
        axes[1].plot(s.t, s.num_fds, label=name, **style)
    axes[0].set_ylabel("RSS - RSS at start (MiB)")
    axes[1].set_ylabel("open fds")
    bin_s = max(1.0, duration_s / 120)
    num_bins = max(1, int(duration_s / bin_s))
    counts = [0] * num_bins
    for t in done_at:
        if 0 <= t < num_bins * bin_s:
            counts[int(t / bin_s)] += 1
    edges = [i * bin_s for i in range(num_bins + 1)]
    axes[2].stairs([c / bin_s for c in counts], edges, label="completed (clients)")
    stolen_t, stolen_rate = _stolen_per_s(series)
    axes[2].plot(stolen_t, stolen_rate, label="stolen (all nodes)", color="tab:orange")
    axes[2].set_ylabel("requests/s")
    axes[2].set_xlabel("seconds since the load started")
    for ax in axes:
        ax.axvspan(0, warmup_s, color="0.92", zorder=0)
        ax.axvline(duration_s, color="0.5", linewidth=0.8)
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="upper left", ncol=2, fontsize=8)
    axes[2].legend(loc="upper left", fontsize=8)
    axes[0].set_title(title)
    fig.text(0.01, 0.005, "grey: warm-up (not judged); vertical line: the load stops, then quiesce", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _stolen_per_s(series: dict[str, Series], min_span_s: float = 5.0) -> tuple[list[float], list[float]]:
    """Requests stolen per second, all nodes together, from the counters' differences (over >= min_span_s)."""
    nodes = [s for s in series.values() if s.counters["stolen_in"]]
    if not nodes:
        return [], []
    num_samples = min(len(s.counters["stolen_in"]) for s in nodes)  # a node that died has fewer
    t = nodes[0].t[:num_samples]
    total = [sum(s.counters["stolen_in"][i] for s in nodes) for i in range(num_samples)]
    times, rates, j = [], [], 0
    for i in range(1, len(t)):
        if t[i] - t[j] >= min_span_s:
            times.append(t[i])
            rates.append((total[i] - total[j]) / (t[i] - t[j]))
            j = i
    return times, rates

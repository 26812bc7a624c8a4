"""The chaos run's timeline: per node, how many requests it served and held over time, with
every fault drawn where and when it hit (matplotlib, PNG)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from bench.chaos_checker import FaultEvent, RequestRecord

KIND_COLORS = {
    "kill9_thief": "#d62728", "kill9_origin": "#ff7f0e", "sigstop_thief": "#9467bd", "sigstop_origin": "#c5b0d5",
    "engine_stall_thief": "#8c564b", "engine_stall_origin": "#e377c2",
    "redis_restart": "#7f7f7f", "redis_flushall": "#17becf", "link_delay": "#bcbd22", "link_cut": "#2ca02c",
}


def serving_spans(record: RequestRecord) -> list[tuple[float, float, str]]:
    """(first, last, node): for each stretch of the stream whose tokens came from one node, the
    arrival times of its first and last chunk (a node that stops sending ends its stretch there)."""
    spans: list[tuple[float, float, str]] = []
    current: str | None = None
    first = last = 0.0
    for chunk in record.chunks:
        if chunk.served_by and chunk.served_by != current:
            if current is not None:
                spans.append((first, last, current))
            current, first = chunk.served_by, chunk.t
        last = chunk.t
    if current is not None:
        spans.append((first, last, current))
    return spans


def _steps(intervals: Iterable[tuple[float, float]]) -> tuple[list[float], list[int]]:
    changes: list[tuple[float, int]] = []
    for start, end in intervals:
        changes += [(start, 1), (end, -1)]
    changes.sort()
    xs, ys, level = [0.0], [0], 0
    for t, delta in changes:
        level += delta
        xs.append(t)
        ys.append(level)
    return xs, ys


def timeline(records: list[RequestRecord], events: list[FaultEvent], node_names: list[str], out: Path,
             title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(node_names), 1, figsize=(14, 1.9 * len(node_names) + 1.2), sharex=True,
                             squeeze=False)
    spans = [span for record in records for span in serving_spans(record)]
    for ax, name in zip(axes[:, 0], node_names):
        held = [(r.accepted_at, r.ended_at) for r in records
                if r.origin == name and r.accepted_at is not None and r.ended_at is not None]
        xs, ys = _steps(held)
        ax.step(xs, ys, where="post", color="0.55", linewidth=0.9, label="in flight here (origin)")
        xs, ys = _steps((a, b) for a, b, node in spans if node == name)
        ax.step(xs, ys, where="post", color="tab:blue", linewidth=1.2, label="streaming from here")
        for event in events:
            color = KIND_COLORS.get(event.kind, "black")
            if event.node is None:  # Redis: the whole cluster
                ax.axvspan(event.at, max(event.until, event.at + 0.05), color=color, alpha=0.25, linewidth=0)
            elif event.node == name:
                ax.axvspan(event.at, max(event.until, event.at + 0.08), color=color, alpha=0.45, linewidth=0)
                ax.annotate(f"#{event.fault_id}", (event.at, 1.0), xycoords=("data", "axes fraction"),
                            fontsize=7, va="top", color=color)
        ax.set_ylabel(name)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=8)
    kinds = sorted({e.kind for e in events})
    if kinds:
        fig.legend(handles=[Patch(color=KIND_COLORS.get(k, "black"), alpha=0.6, label=k) for k in kinds],
                   loc="lower center", ncol=min(5, len(kinds)), fontsize=8)
    axes[-1, 0].set_xlabel("seconds since the driver started")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 if kinds else 0, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)

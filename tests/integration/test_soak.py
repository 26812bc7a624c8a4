"""One minute of ``python -m bench.soak``: a real Redis, three real node processes, open-loop load."""

from __future__ import annotations

import json

from bench import soak
from bench.soak_probe import GAUGES
from bench.soak_report import growth

MINUTES = 1.0
MAX_FD_GROWTH = 4  # median of the last quarter vs the first; keep-alive connections come and go


def test_one_minute_soak_leaves_nothing_behind(tmp_path):
    """Every request completes (or, for the clients that hang up on purpose, is cancelled), no errors,
    stealing goes on, every gauge is back to 0 after quiesce, open fds do not creep up, and the
    JSON and PNG are written. The full verdict (RSS included) must pass too."""
    result = soak.run(minutes=MINUTES, out=tmp_path / "soak", seed=3)

    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(result.log_dir.glob("*.log")))
    failed = [c for c in result.checks if not c.ok]
    assert not failed, f"{failed}\n{logs}"

    tallies = list(result.load.tallies.values())
    sent = sum(t.sent for t in tallies)
    completed, hung_up = sum(t.completed for t in tallies), sum(t.hung_up for t in tallies)
    assert 0 == sum(t.errors for t in tallies), result.load.error_samples
    assert sent == completed + hung_up
    assert sent > 200 and hung_up > 0
    counters = result.node_counters
    for name, c in counters.items():
        assert c["received"] == c["completed"] + c["cancelled"], (name, c)
        assert 0 == c["failed"] + c["rejected"] + c["resumed"] + c["stream_gaps"], (name, c)
    assert sum(c["received"] for c in counters.values()) == sent
    assert sum(c["cancelled"] for c in counters.values()) > 0
    assert sum(c["stolen_in"] for c in counters.values()) > 0

    duration_s = MINUTES * 60
    for name, series in result.series.items():
        if name != "redis":
            assert {g: series.gauges[g][-1] for g in GAUGES} == {g: 0 for g in GAUGES}, name
        fds = growth(series.t, series.num_fds, warmup_s=10, end_s=duration_s)
        assert fds is not None and fds.delta <= MAX_FD_GROWTH, (name, fds)

    assert result.png_path.stat().st_size > 10_000
    saved = json.loads(result.json_path.read_text())
    assert saved["ok"] is True
    assert set(saved["series"]) == {"node0", "node1", "node2", "redis"}
    assert len(saved["series"]["node0"]["t"]) >= 40

"""The soak's growth verdict: medians of quarters after a warm-up, robust to spikes."""

from __future__ import annotations

from bench.soak_probe import ProcSample, Series
from bench.soak_report import Limits, growth, growth_checks, log_checks, log_records, shutdown_notes


def series_of(rss_mib: list[float], fds: list[int]) -> Series:
    s = Series()
    for t, (rss, n) in enumerate(zip(rss_mib, fds)):
        s.add(float(t), ProcSample(int(rss * 1024), n, 1))
    return s


def test_growth_compares_medians_of_the_first_and_last_quarter_after_warmup():
    t = [float(i) for i in range(20)]
    values = [100.0] * 4 + [1.0, 2.0, 3.0, 4.0] + [5.0] * 8 + [9.0, 10.0, 11.0, 12.0]
    g = growth(t, values, warmup_s=4, end_s=20)  # 16 samples judged: quarters of 4
    assert (g.first, g.last, g.num_samples) == (2.5, 10.5, 4)
    assert g.delta == 8.0


def test_growth_needs_a_sample_in_each_quarter():
    assert growth([0.0, 1.0, 2.0], [1.0, 2.0, 3.0], warmup_s=0, end_s=3) is None
    assert growth([0.0, 1.0, 2.0, 3.0, 4.0], [1.0] * 5, warmup_s=2, end_s=5) is None


def test_single_spikes_do_not_fail_a_flat_process():
    rss = [60.0] * 40
    fds = [40] * 40
    rss[35], fds[36], fds[38] = 90.0, 80, 70  # a burst near the end
    checks = growth_checks("node0", series_of(rss, fds), Limits(warmup_s=4), end_s=40)
    assert [c.ok for c in checks] == [True, True]


def test_a_steady_climb_fails():
    rss = [60.0 + 0.5 * i for i in range(40)]  # 0.5 MiB per sample: a leak
    fds = [40 + i // 2 for i in range(40)]
    checks = growth_checks("node0", series_of(rss, fds), Limits(warmup_s=4), end_s=40)
    assert [(c.name, c.ok) for c in checks] == [("node0: RSS growth", False), ("node0: fd growth", False)]


LOG = """\
2026-11-30 16:35:28,199 WARNING node0 p2psched.node: registry unavailable
2026-11-30 16:35:29,100 ERROR node0 aiohttp.server: Error handling request from 127.0.0.1
Traceback (most recent call last):
  File "aiohttp/http_writer.py", line 114, in _writelines
aiohttp.client_exceptions.ClientConnectionResetError: Cannot write to closing transport
2026-11-30 16:35:30,000 INFO node0 p2psched.node: node node0 stopped
"""


def test_log_records_keep_a_traceback_with_its_record():
    records = log_records("Exception in thread engine:\nTraceback (most recent call last):\n" + LOG)
    assert [level for level, _ in records] == ["", "WARNING", "ERROR", "INFO"]
    assert records[2][1].endswith("Cannot write to closing transport")


def test_errors_and_tracebacks_fail_warnings_do_not():
    [clean] = log_checks({"node0": LOG.replace("ERROR node0 aiohttp.server", "INFO node0 aiohttp.server")
                          .replace("Traceback (most recent call last):\n", "")})
    assert (clean.ok, clean.detail.split(";")[0]) == (True, "0 errors, 1 warnings")
    [hang_up] = log_checks({"node0": LOG})  # a write to a client that hung up used to be logged so: now a bug
    assert not hang_up.ok
    [bad] = log_checks({"node1": "Exception in thread engine:\nTraceback (most recent call last):\nRuntimeError: x\n"})
    assert not bad.ok
    notes = shutdown_notes({"node1": "Traceback (most recent call last):\nRuntimeError: Event loop is closed\n"},
                           {"node1": -9})
    assert notes == ["node1's exit code: -9",
                     "node1 logged while shutting down: Traceback (most recent call last): ... "
                     + "RuntimeError: Event loop is closed"]

"""The chaos suite, short: 4 sim nodes behind link proxies, ~120 streamed requests, 8 faults of
mixed kinds (kill -9 of thieves and origins, SIGSTOP, Redis restart and FLUSHALL, link delay
and cut). ``python -m bench.chaos`` is the long version; a failure here names the seed, and
``--replay <out>/schedule.json`` runs the same plan again."""

from __future__ import annotations

from pathlib import Path

from bench.chaos import run_chaos, summary_json
from bench.chaos_schedule import make_plan

SEED = 11


def test_chaos_short_run_loses_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    plan = make_plan(SEED, num_nodes=4, num_requests=120, num_faults=8)
    result = run_chaos(plan, tmp_path / "chaos")
    report = result.report
    failures = "\n".join(f"request {v.index}: {v.status}: {v.detail}" for v in report.failures[:20])
    context = (f"seed {SEED}; out dir {result.out_dir} (schedule.json, records.jsonl, logs/)\n{failures}\n"
               f"leaks: {report.leaks}\nfaults: " + "\n".join(result.notes))
    assert report.faults_injected >= 6, context  # the faults found something to hit
    assert report.accepted >= 100 and result.stolen_requests >= 10, context  # stealing really happened
    assert report.completed_exactly + report.errored_origin_died + report.not_accepted == report.sent, context
    assert (report.lost, report.duplicated, report.missing, report.wrong) == (0, 0, 0, 0), context
    assert report.leaks == [], context
    assert report.ok and summary_json(result)["report"]["ok"]
    assert (tmp_path / "chaos" / "summary.json").is_file() and (tmp_path / "chaos" / "schedule.json").is_file()

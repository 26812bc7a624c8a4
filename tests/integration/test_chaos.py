"""The chaos suite, short: 4 sim nodes behind link proxies (the last one with a quarter of the
context and half the speed), 100 streamed requests at 8/s, 8 faults of mixed kinds (engine
stalls of a thief and of origins, SIGSTOP of both, kill -9 of a thief, a link delay).
``python -m bench.chaos`` is the long version; the same plan from the command line is
``python -m bench.chaos --requests 100 --faults 8 --seed 48 --rate 8``, and a failure here names
the out dir, whose ``schedule.json`` ``--replay`` runs again."""

from __future__ import annotations

from pathlib import Path

from bench.chaos import run_chaos, summary_json
from bench.chaos_schedule import ODD_NODE_ARGS, STALL_KINDS, make_plan, make_workload

SEED = 48  # stalls: thief@before_last, origin@mid_decode, origin@prefill; sigstop x3, kill9_thief, link_delay


def test_chaos_short_run_loses_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    plan = make_plan(SEED, num_nodes=4, num_requests=100, num_faults=8, rate=8.0)
    assert {f.kind for f in plan.faults} >= set(STALL_KINDS)  # the plan itself, before anything runs
    assert plan.per_node_args[-1] == ODD_NODE_ARGS and plan.contexts["node3"] < plan.contexts["node0"]
    probes = sum(spec.is_door_probe for spec in make_workload(plan))
    assert probes >= 1
    result = run_chaos(plan, tmp_path / "chaos")
    report = result.report
    failures = "\n".join(f"request {v.index}: {v.status}: {v.detail}" for v in report.failures[:20])
    context = (f"seed {SEED}; out dir {result.out_dir} (schedule.json, records.jsonl, logs/)\n{failures}\n"
               f"leaks: {report.leaks}\nfaults: " + "\n".join(result.notes))
    assert report.faults_injected >= 6, context  # the faults found something to hit
    assert result.stalls_seen >= 1, context  # an engine stall really hung a step (/health said 503 engine_stalled)
    assert report.accepted >= 90 and result.stolen_requests >= 10, context  # stealing really happened
    assert report.stolen_by.get("node3", 0) >= 1, context  # the short, slow node stole too ...
    assert report.over_context == 0, context  # ... only what fits its context
    assert report.refused_over_context == probes, context  # its HTTP door refused what does not fit
    assert report.completed_exactly + report.errored_origin_died + report.not_accepted \
        + report.refused_over_context + report.timed_out_waiting == report.sent, context
    assert (report.lost, report.duplicated, report.missing, report.wrong) == (0, 0, 0, 0), context
    assert report.leaks == [], context
    assert report.ok and summary_json(result)["report"]["ok"]
    assert (tmp_path / "chaos" / "summary.json").is_file() and (tmp_path / "chaos" / "schedule.json").is_file()

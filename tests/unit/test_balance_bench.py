"""The balance bench's own parts: workloads are reproducible, metrics match a hand-computed
trace, and the simulator agrees with a two-node case worked by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest

from bench.balance.metrics import RequestRecord, Slo, idle_slot_waits, percentile, summarize
from bench.balance.simulate import ClusterSpec, simulate
from bench.balance.workload import Item, WorkloadSpec, generate, membership, sim_capacity_rps, total_nodes

# ---- workloads ----


def test_the_same_spec_gives_the_same_items_and_another_seed_does_not():
    spec = WorkloadSpec(num_requests=500, rate_rps=20.0, arrival="gamma", long_prompt_fraction=0.1, seed=7)
    assert generate(spec, 4) == generate(spec, 4)
    assert generate(spec, 4) != generate(dataclasses.replace(spec, seed=8), 4)
    assert [item.node for item in generate(spec, 4)[:6]] == [0, 1, 2, 3, 0, 1]
    assert {item.node for item in generate(dataclasses.replace(spec, target="one_node"), 4)} == {0}


@pytest.mark.parametrize("arrival", ["poisson", "gamma", "steady"])
def test_arrivals_keep_the_asked_rate(arrival):
    items = generate(WorkloadSpec(num_requests=20_000, rate_rps=50.0, arrival=arrival, seed=3), 4)
    assert items[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(items, items[1:], strict=False))
    assert items[-1].arrival_s / (len(items) - 1) == pytest.approx(1 / 50.0, rel=0.05)


def test_bursty_arrivals_are_burstier_than_poisson():
    def cv2(arrival: str) -> float:
        items = generate(WorkloadSpec(num_requests=20_000, rate_rps=50.0, arrival=arrival, gamma_shape=0.25), 1)
        gaps = [b.arrival_s - a.arrival_s for a, b in zip(items, items[1:], strict=False)]
        mean = sum(gaps) / len(gaps)
        return sum((g - mean) ** 2 for g in gaps) / len(gaps) / mean ** 2

    assert cv2("poisson") == pytest.approx(1.0, abs=0.1)
    assert cv2("gamma") == pytest.approx(4.0, rel=0.2)  # 1 / shape


def test_output_lengths_are_capped_pareto_with_the_stated_mean():
    spec = WorkloadSpec(num_requests=50_000, seed=5)
    lengths = [item.max_tokens for item in generate(spec, 4)]
    assert min(lengths) == 16 and max(lengths) == 600
    assert sum(lengths) / len(lengths) == pytest.approx(spec.mean_output_tokens, rel=0.03)


def test_capacity_of_the_cost_model_by_hand():
    # 20 ms per step at batch 8, 50 tokens each, no prefill cost: 8 / (50 x 0.02) = 8 requests/s a node
    cost = ClusterSpec().cost
    spec = dataclasses.replace(WorkloadSpec(), output_cap=16, output_scale=50, output_alpha=1000.0)
    assert spec.mean_output_tokens == pytest.approx(16.0)
    assert sim_capacity_rps(cost, 8, spec, 3, slowdowns=(1.0, 2.0)) == pytest.approx(3 * 8 / (16 * 0.02) - 12.5)


def test_membership_changes_route_round_robin_over_the_nodes_in_rotation():
    spec = WorkloadSpec(num_requests=12, rate_rps=10.0, join_at=4, leave_at=8, leaver=1)
    assert total_nodes(spec, 3) == 4
    assert membership(spec, 3, 3) == [0, 1, 2]
    assert membership(spec, 3, 4) == [0, 1, 2, 3]
    assert membership(spec, 3, 8) == [0, 2, 3]
    # each request to the next node in rotation after the last one: the joiner, 3, gets r6 first
    assert [item.node for item in generate(spec, 3)] == [0, 1, 2, 0, 1, 2, 3, 0, 2, 3, 0, 2]
    plain = dataclasses.replace(spec, join_at=None, leave_at=None)
    assert [(i.arrival_s, i.max_tokens) for i in generate(spec, 3)] == [(i.arrival_s, i.max_tokens)
                                                                        for i in generate(plain, 3)]
    with pytest.raises(ValueError):
        WorkloadSpec(num_requests=12, join_at=12)
    with pytest.raises(ValueError):
        generate(dataclasses.replace(spec, leaver=3), 3)


# ---- metrics ----


def test_idle_slot_waits_of_a_known_trace():
    """One slot per node, steps of 0.1 s. a runs on n0 from 0 to 1.0; b arrives at 0.2 on n0 and
    starts there at 1.0 (first token 1.1): n1 sat idle until c took it at 0.5, so b waited 0.3 s
    with a free slot; c arrives at 0.5 and starts at once (first token 0.6): 0."""
    a = RequestRecord(0, 0.0, "n0", "n0", token_times=[0.1], num_tokens=1, finish_s=1.0)
    b = RequestRecord(1, 0.2, "n0", "n0", token_times=[1.1], num_tokens=1, finish_s=1.5)
    c = RequestRecord(2, 0.5, "n1", "n1", token_times=[0.6], num_tokens=1, finish_s=2.0)
    waits = idle_slot_waits([a, b, c], 1, 0.1)
    assert waits == pytest.approx({0: 0.0, 1: 0.3, 2: 0.0})
    # n1 only joins at 0.4: b waited with a free slot from 0.4 to 0.5
    assert idle_slot_waits([a, b, c], 1, 0.1, {"n1": (0.4, math.inf)}) == pytest.approx({0: 0.0, 1: 0.1, 2: 0.0})
    # with two slots a node always had one free for b
    assert idle_slot_waits([a, b, c], 2, 0.1)[1] == pytest.approx(0.8)


def test_metrics_of_a_known_trace():
    a = RequestRecord(0, 0.0, "n0", "n0", token_times=[0.1, 0.2, 0.4], num_tokens=3, finish_s=0.4)
    b = RequestRecord(1, 1.0, "n1", "n0", token_times=[1.5, 1.6], num_tokens=5, finish_s=1.9)
    c = RequestRecord(2, 1.0, "n1", error="engine failure")
    s = summarize([a, b, c], Slo(ttft_s=0.2, tpot_s=0.5))
    assert (s["requests"], s["completed"], s["failed"], s["served_elsewhere"]) == (3, 2, 1, 1)
    assert s["makespan_s"] == pytest.approx(1.9)
    assert s["output_throughput"] == pytest.approx(8 / 1.9)
    assert s["goodput"] == pytest.approx(1 / 1.9)  # b's first token took 0.5 s
    assert s["ttft"]["mean"] == pytest.approx(0.3) and s["ttft"]["p50"] == pytest.approx(0.3)
    assert s["ttft"]["p99"] == pytest.approx(0.1 + 0.4 * 0.99)
    assert s["tpot"]["mean"] == pytest.approx((0.15 + 0.1) / 2)  # (0.4-0.1)/2 and (1.9-1.5)/4
    assert sorted([round(x, 9) for x in (a.itls + b.itls)]) == [0.1, 0.1, 0.2]
    assert s["itl"]["p50"] == pytest.approx(0.1)
    assert s["e2el"]["mean"] == pytest.approx((0.4 + 0.9) / 2)


def test_percentiles_interpolate_between_order_statistics():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([1.0], 99) == 1.0
    assert math.isnan(percentile([], 50))


# ---- the simulator against a case worked by hand ----

HAND = ClusterSpec(nodes=2, max_num_seqs=1, latency_s=0.0, redis_latency_s=0.0)


def three_at_once() -> list[Item]:
    """Three 10-token requests at t = 0, all sent to node 0; a step is 20 ms whatever the batch."""
    return [Item(i, 0.0, 0, 8, 10) for i in range(3)]


def ttfts(mode: str) -> list[float]:
    return [round(r.ttft or -1, 6) for r in simulate(HAND, mode, three_at_once()).records]  # type: ignore[arg-type]


def test_local_runs_them_one_after_another():
    result = simulate(HAND, "local", three_at_once())
    assert ttfts("local") == [0.02, 0.22, 0.42]  # 10 steps of 20 ms each before the next starts
    assert [r.finish_s for r in result.records] == pytest.approx([0.2, 0.4, 0.6])
    assert {r.served_by for r in result.records} == {"node0"}


def test_oracle_starts_two_at_once_and_the_third_when_a_slot_frees():
    result = simulate(HAND, "oracle", three_at_once())
    assert ttfts("oracle") == [0.02, 0.02, 0.22]
    assert [r.finish_s for r in result.records] == pytest.approx([0.2, 0.2, 0.4])


def test_global_idle_node_takes_the_oldest_waiting_request_when_it_next_hears_of_it():
    """Node 1 is idle and asks node 0 how its queue looks every 20 ms; its probe rounds fall at
    t = 15 ms (phases set by the warm-up and the node index). Node 0's queue then holds r1 and
    r2 (r0 runs): node 1 steals the oldest, r1, and runs it from 15 ms; r2 starts on node 0
    when r0 ends. A pooled queue would have started r1 at once: the 15 ms is the cost of
    hearing about it."""
    result = simulate(HAND, "global", three_at_once())
    assert [r.served_by for r in result.records] == ["node0", "node1", "node0"]
    assert ttfts("global") == [0.02, 0.035, 0.22]
    assert [r.finish_s for r in result.records] == pytest.approx([0.2, 0.215, 0.4])
    assert (result.counters.steals_granted, result.counters.tasks_stolen) == (1, 1)


def test_fastdeploy_idle_node_is_blind_until_its_blpop_runs_out():
    """FastDeploy's insert loops block on their own list for 2 s when no peer had a queue as they
    looked. Node 1 started looking at -2.975 s (its phase), found nothing, and blocks until
    -0.975 s, then (after the 1 ms sleep of an empty get) until 1.026 s. Node 0 takes r0 at once
    from its own list, and r1 and r2 as its one slot frees: by 1.026 s they have all started, so
    the idle node never helps and the result is ``local``'s."""
    result = simulate(HAND, "fastdeploy", three_at_once())
    assert ttfts("fastdeploy") == ttfts("local") == [0.02, 0.22, 0.42]
    assert {r.served_by for r in result.records} == {"node0"}
    assert result.counters.tasks_stolen == 0
    assert result.counters.redis_commands > 3 * (4 + 6)  # every put alone: RPUSH and ZINCRBY, each in a MULTI


def test_fastdeploy_thief_takes_the_front_of_the_queue_when_it_next_looks():
    """With 2 s requests (100 tokens) r1 and r2 still wait when node 1's BLPOP runs out at
    1.026 s; at 1.027 s it reads the load set (node 0: 2 queued), pops one (half its one free
    slot, rounded up) from the front: r1, the oldest, starting at 1.027 s. r2 waits for node 0."""
    items = [Item(i, 0.0, 0, 8, 100) for i in range(3)]
    result = simulate(HAND, "fastdeploy", items)
    assert [r.served_by for r in result.records] == ["node0", "node1", "node0"]
    assert [round(r.ttft or -1, 6) for r in result.records] == [0.02, 1.047, 2.02]
    assert (result.counters.steals_granted, result.counters.tasks_stolen) == (1, 1)

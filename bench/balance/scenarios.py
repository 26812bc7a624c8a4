"""The issue's workloads through the simulator, side by side: ``python -m bench.balance.scenarios``.

Each row is one seeded workload at 4 nodes (8 slots, 20 ms steps) in every mode, with the same
items; the table gives p99 TTFT per mode, how far ``global`` is from the pooled queue, and its ratio
to FastDeploy's. With "outputs end on EOS" no request's end is announced by its ``max_tokens``
(decision 43's just-in-time steal never fires). In the last two rows the membership changes half-way: a fifth node joins (the
front door's rotation takes it in when it is up), or node 1 leaves (it drains); the load is of the
four nodes' capacity.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from .simulate import MODES, ClusterSpec, simulate
from .workload import WorkloadSpec, generate, sim_capacity_rps, total_nodes

SCENARIOS: dict[str, dict[str, Any]] = {
    "poisson 50%": {"load": 0.5},
    "poisson 70%": {"load": 0.7},
    "poisson 90%": {"load": 0.9},
    "poisson 95%": {"load": 0.95},
    "bursty (gamma, cv2 4) 90%": {"load": 0.9, "work": {"arrival": "gamma", "gamma_shape": 0.25}},
    "all to one node 90%": {"load": 0.9, "work": {"target": "one_node"}},
    "node 0 twice as slow 90%": {"load": 0.9, "slowdowns": (2.0,)},
    "10% long prompts (1-2k), prefill cost 90%": {"load": 0.9, "work": {"long_prompt_fraction": 0.1},
                                                  "prefill_ms_per_token": 0.02},
    "outputs end on EOS, unannounced 90%": {"load": 0.9, "eos": True},
    "a node joins half-way 90% (72% of 5)": {"load": 0.9, "join": 0.5},
    "node 1 leaves half-way 70% (93% of 3)": {"load": 0.7, "leave": 0.5},
}


def run(name: str, nodes: int, requests: int, seed: int) -> list[str]:
    scenario = SCENARIOS[name]
    base = ClusterSpec()
    cost = dataclasses.replace(base.cost, prefill_ms_per_token=scenario.get("prefill_ms_per_token", 0.0))
    join_at = int(requests * scenario["join"]) if "join" in scenario else None
    leave_at = int(requests * scenario["leave"]) if "leave" in scenario else None
    work = WorkloadSpec(num_requests=requests, seed=seed, join_at=join_at, leave_at=leave_at, **scenario.get("work", {}))
    slowdowns = scenario.get("slowdowns", ())
    capacity = sim_capacity_rps(cost, base.max_num_seqs, work, nodes, slowdowns)
    items = generate(work.at_rate(scenario["load"] * capacity), nodes)
    # each change when the first request that sees it arrives (as the harness makes them)
    joins = ((nodes, items[work.join_at].arrival_s),) if work.join_at is not None else ()
    leaves = ((work.leaver, items[work.leave_at].arrival_s),) if work.leave_at is not None else ()
    spec = ClusterSpec(nodes=total_nodes(work, nodes), cost=cost, slowdowns=slowdowns, seed=seed, joins=joins,
                       leaves=leaves, eos=scenario.get("eos", False))
    out = {mode: simulate(spec, mode, items).summary for mode in MODES}
    p99 = {mode: out[mode]["ttft"]["p99"] for mode in MODES}
    gap_ms = (p99["global"] - p99["oracle"]) * 1000
    e2e = out["global"]["e2el"]["mean"] / out["oracle"]["e2el"]["mean"]
    return [name, *(f"{p99[m]:.3f}" for m in MODES), f"{gap_ms:+.0f}", f"{p99['global'] / p99['fastdeploy']:.2f}",
            f"{(e2e - 1) * 100:+.1f}%", f"{out['global']['redis_commands_per_s_per_node']:.1f}",
            f"{out['fastdeploy']['redis_commands_per_s_per_node']:.0f}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.balance.scenarios", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    header = ["scenario", *(f"{m} p99 TTFT s" for m in MODES), "global - oracle p99 ms", "global / fastdeploy p99",
              "global / oracle mean E2EL", "global Redis cmd/s/node", "fastdeploy Redis cmd/s/node"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in SCENARIOS:
        print("| " + " | ".join(run(name, args.nodes, args.requests, args.seed)) + " |", flush=True)
        print(f"done: {name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A node's counters. Plain numbers, read by /stats, the demo and (later) Prometheus."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Stats:
    rejected: int = 0  # refused at the HTTP edge (4xx, 429, 503)
    received: int = 0  # accepted from HTTP clients
    completed: int = 0  # of those, finished (wherever they ran)
    failed: int = 0
    cancelled: int = 0
    ran_locally: int = 0  # own requests finished by our engine
    stolen_out: int = 0  # own requests granted to thieves
    stolen_in: int = 0  # tasks received from victims
    stolen_in_completed: int = 0
    resumed: int = 0  # own requests taken back after a lease expiry or stream gap
    steals_attempted: int = 0
    steals_granted: int = 0  # steal RPCs answered with at least one task
    steals_empty: int = 0
    steals_timed_out: int = 0
    steals_wrong_node: int = 0  # answered by a new process on the victim's ports (the victim restarted)
    late_grants: int = 0  # grants applied after their steal timed out (their tasks are leased to us)
    grants_dropped: Counter[str] = field(default_factory=Counter)  # reason -> grants not applied (steals.py)
    grants_replayed: int = 0  # repeated steal ids answered with the cached grant (victim side)
    lease_expiries: int = 0
    stream_gaps: int = 0
    duplicate_items: int = 0
    invalid_items: int = 0  # token items no engine of ours could have made (fenced like a gap)
    stale_items: int = 0
    token_messages_sent: int = 0
    token_items_forwarded: int = 0
    tokens_forwarded: int = 0  # token ids sent to origins
    handed_back: int = 0  # stolen tasks given back to their origins unrun (cannot run, expired, draining)
    handbacks_received: int = 0  # own tasks thieves gave back
    unsendable: int = 0  # requests that failed the protocol check when granted (a bug if ever > 0)
    origin_losses: int = 0  # stolen-in tasks dropped because their origin went silent
    registry_errors: int = 0
    sends_failed: int = 0  # a send refused at once (peer gone, its byte budget spent)
    send_budget_refusals: int = 0  # of those, refused because the peer's queued bytes hit the budget
    probes_sent: int = 0  # queue probes sent to peers (balance.py)
    busy_s: float = 0.0  # engine time spent in steps
    malformed: Counter[str] = field(default_factory=Counter)  # socket name -> frames dropped
    unauthorized: Counter[str] = field(default_factory=Counter)  # socket name -> messages refused (who sent them)
    loop_errors: Counter[str] = field(default_factory=Counter)  # loop -> unexpected errors contained
    bad_peer_records: int = 0  # registry records skipped as unusable

    def as_dict(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        for name in ("malformed", "unauthorized", "loop_errors", "grants_dropped"):
            out[name] = dict(getattr(self, name))
        return out

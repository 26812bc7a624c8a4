"""Stealing policy: pure functions, no I/O, no clock.

- ``choose_victims``: which peers a thief asks, in order.
- ``select_grant``: what a victim gives a thief from its pending queue.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from .request import Request


@dataclass(frozen=True)
class PeerLoad:
    node_id: str
    name: str
    model_id: str
    steal_endpoint: str
    result_endpoint: str
    pending: int
    pending_tokens: int = 0
    running: int = 0


def choose_victims(peers: Iterable[PeerLoad], self_id: str, model_id: str,
                   min_load_score: int, rng: random.Random) -> list[PeerLoad]:
    """Peers worth a steal, most loaded first; ties in random order (spreads the herd)."""
    candidates = [p for p in peers
                  if p.node_id != self_id and p.model_id == model_id and p.pending >= min_load_score]
    rng.shuffle(candidates)
    candidates.sort(key=lambda p: (p.pending, p.pending_tokens), reverse=True)
    return candidates


def select_grant(from_back: Iterable[Request], total_work: int, max_requests: int,
                 max_tokens: int) -> list[Request]:
    """Requests to hand a thief, taken from the back of the queue.

    ``from_back`` walks the pending queue back to front, without its head (the request the
    engine starts next); ``total_work`` is the queue's work in tokens. Never a pinned request,
    nothing that does not fit the thief, and up to about half of the queue's work: it stops
    after the request that reaches half (at least one request is given when any fits).
    """
    half = total_work / 2
    granted: list[Request] = []
    granted_work = 0
    budget = max_tokens
    for request in from_back:
        if len(granted) >= max_requests or granted_work >= half:
            break
        if request.is_pinned or request.reserved_tokens > budget:
            continue
        granted.append(request)
        granted_work += request.work_tokens
        budget -= request.reserved_tokens
    return granted

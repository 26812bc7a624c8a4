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
    public_key: str = ""  # CurveZMQ, z85; "" when the peer runs without keys


def choose_victims(peers: Iterable[PeerLoad], self_id: str, model_id: str,
                   min_load_score: int, rng: random.Random) -> list[PeerLoad]:
    """Peers worth a steal, most loaded first; ties in random order (spreads the herd)."""
    candidates = [p for p in peers
                  if p.node_id != self_id and p.model_id == model_id and p.pending >= min_load_score]
    rng.shuffle(candidates)
    candidates.sort(key=lambda p: (p.pending, p.pending_tokens), reverse=True)
    return candidates


def select_grant(from_back: Iterable[Request], total_work: int, max_requests: int,
                 max_tokens: int, max_model_len: int, thief_id: str) -> list[Request]:
    """Requests to hand a thief, taken from the back of the queue.

    ``from_back`` walks the pending queue back to front, without its head (the request the
    engine starts next); ``total_work`` is the queue's work in tokens. Never a pinned request,
    nothing that does not fit the thief (its free KV tokens, its engine's context length), nothing
    this thief handed back before, and up to about half of the queue's work: it stops after the
    request that reaches half (at least one request is given when any fits).
    """
    half = total_work / 2
    granted: list[Request] = []
    granted_work = 0
    budget = max_tokens
    for request in from_back:
        if len(granted) >= max_requests or granted_work >= half:
            break
        if request.is_pinned or request.reserved_tokens > budget or request.reserved_tokens > max_model_len \
                or thief_id in request.refused_by:
            continue
        granted.append(request)
        granted_work += request.work_tokens
        budget -= request.reserved_tokens
    return granted


class StealBackoff:
    """When to ask a victim again after it had nothing for us (or did not answer).

    Each fruitless steal doubles that victim's wait, from ``base`` up to ``cap`` seconds; a grant
    clears it, and so does news that the victim's queue changed since it last turned us away (the
    registry, a grant or a load report says so), because then there may be something new to take.
    """

    def __init__(self, base: float = 0.05, cap: float = 1.0):
        self._base = base
        self._cap = cap
        self._state: dict[str, tuple[float, float, int]] = {}  # node id -> (not before, wait, pending then)

    def is_ready(self, peer: PeerLoad, now: float) -> bool:
        state = self._state.get(peer.node_id)
        if state is None:
            return True
        not_before, _, pending_then = state
        if peer.pending != pending_then:
            del self._state[peer.node_id]
            return True
        return now >= not_before

    def fruitless(self, peer: PeerLoad, now: float, pending_now: int) -> None:
        _, wait, _ = self._state.get(peer.node_id, (0.0, self._base / 2, 0))
        wait = min(self._cap, wait * 2)
        self._state[peer.node_id] = (now + wait, wait, pending_now)

    def granted(self, peer: PeerLoad) -> None:
        self._state.pop(peer.node_id, None)

    def forget(self, keep: set[str]) -> None:
        for node_id in [n for n in self._state if n not in keep]:
            del self._state[node_id]

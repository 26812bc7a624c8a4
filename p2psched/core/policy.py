"""Stealing policy: pure functions, no I/O, no clock.

- ``PeerLoad``: a registered peer (its endpoints and key; the load its record showed when first
  read, for information: thieves go by what peers report, ``balance.py``).
- ``select_grant``: what a victim gives a thief from its pending queue.

Whom a thief asks, and when, is ``balance.py``.
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


def select_grant(queue: Iterable[Request], max_requests: int, max_tokens: int, max_model_len: int,
                 thief_id: str, arrived_by: float) -> list[Request]:
    """Requests to hand a thief: the oldest first, as one pooled queue would start them.

    ``queue`` walks the pending queue front to back (oldest first). Only requests that arrived
    at or before ``arrived_by`` (the thief asks for those that have waited longer than its own
    oldest), never a pinned one, nothing that does not fit the thief (its KV tokens, in
    ``kv_reservation``'s full form, and its engine's context length), nothing this thief handed
    back before; at most ``max_requests``.
    """
    granted: list[Request] = []
    budget = max_tokens
    for request in queue:
        if request.is_pinned:  # (a resumed request goes to the front whatever its age)
            continue
        if len(granted) >= max_requests or request.arrival > arrived_by:
            break  # the queue is oldest first: the rest are younger still
        if request.reserved_tokens > budget or request.reserved_tokens > max_model_len or thief_id in request.refused_by:
            continue
        granted.append(request)
        budget -= request.reserved_tokens
    return granted

"""Whom to steal from, and when: the thief's side of balancing (pure; the node and the
simulator drive it with their clocks).

The bar is one pooled queue: every request starts on the first slot free anywhere, oldest
first. Stealing approaches it from both ends:

- a node with a free slot and nothing queued asks for anything waiting anywhere;
- a node whose own queue is non-empty asks for requests that have waited longer than its own
  oldest (by more than ``margin_s``): they go into its queue by arrival, ahead of its younger
  ones, so across the cluster the oldest requests start first. Measured in the simulator,
  stealing only into idle slots left queues of very different ages behind (a request at the
  back of a long queue waited twice as long as the pooled queue's worst), while no slot was free
  anywhere (``docs/decisions.md``, decision 41);
- just in time: a node whose slot frees with the step now running (a request with one token
  left of its ``max_tokens``) asks then, so that what it takes is at the head of its queue when
  the slot frees: anything that has waited ``margin_s``, if its queue is empty; anything older
  than its own oldest, if not.
  A request taken into a queue otherwise is pinned there until that node has a slot, so then
  the margin is wider (``announced_margin_s``) in proportion to the share of the node's ends
  that came announced like that (decision 43).

What a thief knows of a peer's queue (how many requests it could be given, and how long the
oldest of them has waited) comes from the peers themselves, never from Redis: the answer to a
``Probe`` (sent to ``fanout`` random peers every probe round) and every ``Grant``. A report
ages with the clock (a queue's oldest request keeps waiting) and is forgotten after
``max_age_s``; a peer that did not answer is forgotten at once. Redis only says who the peers
are, so its load does not grow with traffic or with the number of peers a node knows.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass


FRUITLESS_BASE_S = 0.005  # after an empty grant, that peer waits this long (doubling) before we ask again
FRUITLESS_CAP_S = 0.1  # (most empty grants are races with another thief: a long wait costs p99)


@dataclass(frozen=True)
class PeerQueue:
    grantable: int  # requests a thief could be given
    oldest_waited_s: float  # how long the oldest of them had waited, when heard
    heard_at: float  # our clock

    def waited(self, now: float) -> float:
        return self.oldest_waited_s + max(0.0, now - self.heard_at)


@dataclass(frozen=True)
class StealPlan:
    victim_id: str
    max_requests: int
    max_tokens: int
    min_waited_s: float  # the victim grants only requests that have waited this long


class Balancer:
    def __init__(self, node_id: str, rng: random.Random, margin_s: float = 0.1, fanout: int = 3,
                 max_age_s: float = 1.0, min_queue: float = 1, freeing_margin_s: float = 0.0,
                 announced_margin_s: float = 0.3):
        self.node_id = node_id
        self.freeing_margin_s = freeing_margin_s
        self.announced_margin_s = announced_margin_s
        self.min_queue = min_queue  # --scheduler-min-load-score: a victim has at least this many to give
        self.margin_s = margin_s
        self.fanout = fanout
        self.max_age_s = max_age_s
        self._rng = rng
        self._members: list[str] = []
        self._queues: dict[str, PeerQueue] = {}
        self._fruitless: dict[str, tuple[int, float]] = {}  # node id -> (empty grants in a row, not before)

    # ---- who the peers are, and what they said ----

    @property
    def members(self) -> list[str]:
        return list(self._members)

    def set_members(self, node_ids: Iterable[str]) -> None:
        """The peers we may steal from (registry, or static); what we knew of others is dropped."""
        self._members = sorted(set(node_ids) - {self.node_id})
        keep = set(self._members)
        for node_id in [n for n in self._queues if n not in keep]:
            del self._queues[node_id]
        for node_id in [n for n in self._fruitless if n not in keep]:
            del self._fruitless[node_id]

    def heard(self, node_id: str, grantable: int, oldest_waited_s: float, now: float) -> None:
        if node_id in self._members or not self._members:
            self._queues[node_id] = PeerQueue(grantable if oldest_waited_s > 0 else 0, oldest_waited_s, now)

    def lost(self, node_id: str) -> None:
        """It did not answer: forget its queue until it reports again."""
        self._queues.pop(node_id, None)

    def granted(self, node_id: str, fruitless: bool, now: float) -> None:
        """A grant came back. An empty one (what it has does not fit us, or was taken first)
        means: do not ask it again before ``FRUITLESS_BASE_S``, doubling with each one in a row
        up to ``FRUITLESS_CAP_S``, whatever it reports meanwhile; a grant with tasks clears that."""
        if not fruitless:
            self._fruitless.pop(node_id, None)
            return
        count = self._fruitless.get(node_id, (0, 0.0))[0] + 1
        self._fruitless[node_id] = (count, now + min(FRUITLESS_CAP_S, FRUITLESS_BASE_S * 2 ** (count - 1)))

    def queue_of(self, node_id: str) -> PeerQueue | None:
        return self._queues.get(node_id)

    def probe_targets(self) -> list[str]:
        """``fanout`` peers picked at random: the ones to ask for their queues this round."""
        return self._rng.sample(self._members, min(self.fanout, len(self._members)))

    # ---- the decision ----

    def plan(self, now: float, free_slots: int, free_kv_tokens: int, queued: int, own_oldest_waited_s: float,
             max_kv_tokens: int, freeing: int = 0, announced_share: float = 0.0,
             freeing_kv_tokens: int = 0) -> StealPlan | None:
        """The steal to send now, or None.

        With a free slot and an empty queue: up to ``free_slots`` requests, any age, from the
        peer whose oldest has waited longest. Full with nothing queued: up to ``freeing`` (slots
        that free with the running step and no queued request has claimed) that have waited
        ``margin_s`` (a thief slower than its victim otherwise takes what the victim would soon
        start faster itself), within
        ``freeing_kv_tokens`` (what is free once they end); none if no slot frees (work taken now
        would only wait here instead of there). With a queue of our own: one request older than
        our oldest, by ``freeing_margin_s`` if such a slot frees with this step (within
        ``freeing_kv_tokens``), else by ``margin_s`` widened towards
        ``announced_margin_s`` by ``announced_share`` (it queues here, by arrival; the next steal
        may follow at once: one at a time keeps a busy node from holding what an idle one could
        start)."""
        if queued == 0 and free_slots > 0 and free_kv_tokens > 0:
            threshold, max_requests, max_tokens = 0.0, free_slots, free_kv_tokens
        elif queued == 0 and freeing > 0 and freeing_kv_tokens > 0:  # (margin: a slower thief waits for older work)
            threshold, max_requests, max_tokens = self.margin_s, freeing, freeing_kv_tokens
        elif queued > 0 and freeing > 0 and freeing_kv_tokens > 0:
            threshold, max_requests, max_tokens = own_oldest_waited_s + self.freeing_margin_s, 1, freeing_kv_tokens
        elif queued > 0:  # one at a time: a request queued here is pinned here, so commit little
            margin = self.margin_s + (self.announced_margin_s - self.margin_s) * min(1.0, max(0.0, announced_share))
            threshold, max_requests, max_tokens = own_oldest_waited_s + margin, 1, max_kv_tokens
        else:
            return None
        best: tuple[float, float, str] | None = None
        for node_id, queue in list(self._queues.items()):
            if now - queue.heard_at > self.max_age_s:
                del self._queues[node_id]
                continue
            waited = queue.waited(now)
            if queue.grantable < max(1, self.min_queue) or waited <= threshold \
                    or now < self._fruitless.get(node_id, (0, 0.0))[1]:
                continue
            key = (waited, self._rng.random(), node_id)
            if best is None or key > best:
                best = key
        if best is None:
            return None
        return StealPlan(best[2], max(1, max_requests), max_tokens, threshold)

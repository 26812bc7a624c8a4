"""Steal transactions: the thief's table of steals it sent, the victim's cache of grants it made.

Pure: no sockets, no asyncio, the clock passed in. ``peers.py`` (thief) and ``node.py`` (victim)
are the I/O shells that call it.

Theory of operation. A thief sends each steal with a fresh id to one victim and records it in
``SentSteals`` as IN_FLIGHT, with that victim's node id and the send time. The caller then
either gets a Grant (ANSWERED) or gives up waiting (timeout, failed send: ABANDONED); an
abandoned steal may still be answered later. Every Grant that reaches the thief is judged by
``SentSteals.on_grant``, in this order:

    steal id not in the table (never sent, or forgotten)    UNSOLICITED    dropped
    came in on another peer's link, or names another        WRONG_VICTIM   dropped (the record
      victim than the one we asked                                         stays open for the real one)
    steal already answered                                  REPEATED       dropped
    an empty "wrong_node" reply from the victim's link      RESTARTED      nothing applied; the caller
      (a new process holds the victim's ports)                             forgets that peer
    steal in flight                                         APPLY          tasks taken, caller woken
    steal abandoned                                         LATE           tasks taken

Late grants are applied: the victim has already leased their tasks to us, so running them
(or handing them straight back when we cannot: queue full, draining, deadline passed) beats
letting each lease lapse and its origin wait a lease timeout before running it itself.

What is guaranteed: a grant's tasks are applied at most once, and only for a steal this node
sent to that victim among its last ``max_steals`` steals. What is not: that a grant is applied
at all. A lost grant, or one older than the table remembers, is dropped; its leases lapse at
the victim, which then runs the requests itself.

The victim side is ``GrantCache``: a repeated steal id from the same thief is answered with the
bytes of the first answer, so a thief that retransmits cannot be granted twice. It is bounded
in entries and in bytes; the oldest answers go first.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

from .errors import IllegalTransition
from .protocol import Grant
from .stats import Stats

MAX_STEALS_REMEMBERED = 256  # a late grant is still taken while its steal is among the last this many
GRANT_CACHE = 1024  # grants a victim keeps for repeated steal ids
GRANT_CACHE_BYTES = 64 * 1024 * 1024


class StealState(enum.Enum):
    IN_FLIGHT = "in_flight"  # sent, the caller waits
    ABANDONED = "abandoned"  # the caller gave up waiting; a grant may still come
    ANSWERED = "answered"  # a grant (or a restart notice) was taken: later copies are dropped


TRANSITIONS: dict[StealState, frozenset[StealState]] = {
    StealState.IN_FLIGHT: frozenset({StealState.ANSWERED, StealState.ABANDONED}),
    StealState.ABANDONED: frozenset({StealState.ANSWERED}),
    StealState.ANSWERED: frozenset(),
}


class GrantVerdict(enum.Enum):
    APPLY = "apply"
    LATE = "late"
    RESTARTED = "restarted"
    UNSOLICITED = "unsolicited"
    WRONG_VICTIM = "wrong_victim"
    REPEATED = "repeated"

    @property
    def is_applied(self) -> bool:
        """Take the grant: its tasks, and the victim's queue length."""
        return self in (GrantVerdict.APPLY, GrantVerdict.LATE)

    @property
    def is_dropped(self) -> bool:
        return self in (GrantVerdict.UNSOLICITED, GrantVerdict.WRONG_VICTIM, GrantVerdict.REPEATED)


@dataclass
class SentSteal:
    steal_id: str
    victim_id: str
    sent_at: float
    state: StealState = StealState.IN_FLIGHT

    def move(self, new: StealState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"steal {self.steal_id}: {self.state.value} -> {new.value}")
        self.state = new


class SentSteals:
    """The thief's steals, by steal id: which victim, when, and how each ended. Bounded."""

    def __init__(self, stats: Stats, max_steals: int = MAX_STEALS_REMEMBERED):
        self._stats = stats
        self._max = max_steals
        self._steals: OrderedDict[str, SentSteal] = OrderedDict()

    def __len__(self) -> int:
        return len(self._steals)

    def get(self, steal_id: str) -> SentSteal | None:
        return self._steals.get(steal_id)

    def sent(self, steal_id: str, victim_id: str, now: float) -> SentSteal:
        """Record a steal about to be sent. Ids are fresh per attempt; reusing one is a bug."""
        assert steal_id not in self._steals, f"steal id {steal_id} reused"
        steal = SentSteal(steal_id, victim_id, now)
        self._steals[steal_id] = steal
        while len(self._steals) > self._max:
            self._steals.popitem(last=False)
        return steal

    def gave_up(self, steal_id: str) -> None:
        """The caller stopped waiting (timeout, failed send, cancelled). A no-op once answered."""
        steal = self._steals.get(steal_id)
        if steal is not None and steal.state is StealState.IN_FLIGHT:
            steal.move(StealState.ABANDONED)

    def on_grant(self, grant: Grant, via: str, now: float) -> GrantVerdict:
        """Judge a grant that arrived on the link to node ``via``; drops and late grants are counted."""
        verdict = self._judge(grant, via)
        if verdict.is_dropped:
            self._stats.grants_dropped[verdict.value] += 1
        elif verdict is GrantVerdict.LATE:
            self._stats.late_grants += 1
        if verdict.is_applied or verdict is GrantVerdict.RESTARTED:
            self._steals[grant.steal_id].move(StealState.ANSWERED)
        return verdict

    def _judge(self, grant: Grant, via: str) -> GrantVerdict:
        steal = self._steals.get(grant.steal_id)
        if steal is None:
            return GrantVerdict.UNSOLICITED
        if via != steal.victim_id:
            return GrantVerdict.WRONG_VICTIM
        if grant.victim_id != steal.victim_id and not (grant.reason == "wrong_node" and not grant.tasks):
            return GrantVerdict.WRONG_VICTIM
        if steal.state is StealState.ANSWERED:
            return GrantVerdict.REPEATED
        if grant.victim_id != steal.victim_id:
            return GrantVerdict.RESTARTED
        return GrantVerdict.APPLY if steal.state is StealState.IN_FLIGHT else GrantVerdict.LATE


class GrantCache:
    """The victim's answers by (thief id, steal id), bounded in entries and bytes, oldest out first."""

    def __init__(self, stats: Stats, max_grants: int = GRANT_CACHE, max_bytes: int = GRANT_CACHE_BYTES):
        self._stats = stats
        self._max_grants = max_grants
        self._max_bytes = max_bytes
        self._replies: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._replies)

    @property
    def num_bytes(self) -> int:
        return self._bytes

    def replay(self, thief_id: str, steal_id: str) -> bytes | None:
        """The answer this thief already got for this steal id (counted), or None."""
        reply = self._replies.get((thief_id, steal_id))
        if reply is not None:
            self._stats.grants_replayed += 1
        return reply

    def put(self, thief_id: str, steal_id: str, reply: bytes) -> None:
        key = (thief_id, steal_id)
        old = self._replies.pop(key, None)
        if old is not None:
            self._bytes -= len(old)
        if len(reply) > self._max_bytes:
            return  # larger than the whole cache (a grant frame never is): not kept
        self._replies[key] = reply
        self._bytes += len(reply)
        while len(self._replies) > self._max_grants or self._bytes > self._max_bytes:
            _, evicted = self._replies.popitem(last=False)
            self._bytes -= len(evicted)

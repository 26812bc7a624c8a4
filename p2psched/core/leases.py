"""Origin-side lease table: which thief runs which of our requests, under which epoch.

Theory of operation. Granting request R to thief T records a lease (R, T, epoch, next seq,
expiry). Every message from T about R renews it. Token items are accepted only for the current
epoch and the next sequence number: a lower seq is a duplicate, another epoch is stale, a
higher seq is a gap (tokens were lost, so the stream can no longer be trusted). When a lease
expires or shows a gap, the origin bumps the request's epoch (fencing T: anything T sends
later is stale), cancels T best-effort and runs R itself from the tokens already delivered.

Pure: the clock is passed in; no sockets.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass


class Verdict(enum.Enum):
    ACCEPT = "accept"
    DUPLICATE = "duplicate"  # seq already seen: drop
    STALE = "stale"  # not the current lease holder or epoch: drop, tell the sender to stop
    GAP = "gap"  # seq jumped: fence and resume
    FINISHED = "finished"  # retransmitted final of a request already completed: ack again


@dataclass
class Lease:
    request_id: str
    thief_id: str
    thief_name: str
    epoch: int
    expires_at: float
    next_seq: int = 0


class LeaseTable:
    def __init__(self, lease_timeout: float, remember_finished: int = 4096):
        self._timeout = lease_timeout
        self._leases: dict[str, Lease] = {}
        self._finished: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._remember = remember_finished

    def __len__(self) -> int:
        return len(self._leases)

    def grant(self, request_id: str, thief_id: str, thief_name: str, epoch: int, now: float) -> Lease:
        lease = Lease(request_id, thief_id, thief_name, epoch, now + self._timeout)
        self._leases[request_id] = lease
        return lease

    def check_tokens(self, thief_id: str, request_id: str, epoch: int, seq: int, now: float) -> Verdict:
        lease = self._leases.get(request_id)
        if lease is None or lease.thief_id != thief_id or lease.epoch != epoch:
            return Verdict.FINISHED if (request_id, epoch) in self._finished else Verdict.STALE
        if seq < lease.next_seq:
            lease.expires_at = now + self._timeout
            return Verdict.DUPLICATE
        if seq > lease.next_seq:
            return Verdict.GAP
        lease.next_seq += 1
        lease.expires_at = now + self._timeout
        return Verdict.ACCEPT

    def renew(self, thief_id: str, request_id: str, epoch: int, now: float) -> bool:
        """A heartbeat: True if the thief still holds this lease."""
        lease = self._leases.get(request_id)
        if lease is None or lease.thief_id != thief_id or lease.epoch != epoch:
            return False
        lease.expires_at = now + self._timeout
        return True

    def release(self, request_id: str, finished: bool = False) -> Lease | None:
        lease = self._leases.pop(request_id, None)
        if lease is not None and finished:
            self._finished[(request_id, lease.epoch)] = None
            while len(self._finished) > self._remember:
                self._finished.popitem(last=False)
        return lease

    def expired(self, now: float) -> list[Lease]:
        """Remove and return the leases whose thief has been silent past the timeout."""
        gone = [lease for lease in self._leases.values() if lease.expires_at <= now]
        for lease in gone:
            del self._leases[lease.request_id]
        return gone

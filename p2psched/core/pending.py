"""The pending queue: accepted requests not started yet, oldest first (by arrival at their
origin), the order the engine takes them and the order victims grant them in.

New requests are pushed at the back; a request that comes back (handed back, resumed, or
stolen from a peer, where it had already waited) is inserted by its arrival, which walks only
past the younger ones. Removal from anywhere (a grant or a cancel) is O(1); ``total_work`` is
kept up to date so the published load never walks the queue.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator

from .request import Request


class PendingQueue:
    def __init__(self) -> None:
        self._items: OrderedDict[str, Request] = OrderedDict()
        self._front: set[str] = set()  # pushed to the front (resumed): nothing is inserted ahead of them
        self.total_work = 0  # sum of work_tokens: fixed per request while it waits here

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._items.values())

    def head(self) -> Request | None:
        return next(iter(self._items.values()), None)

    def push_back(self, request: Request) -> None:
        self._items[request.request_id] = request
        self.total_work += request.work_tokens

    def push_front(self, request: Request) -> None:
        """Next to start, whatever its age (a request resumed here after its thief went silent:
        its client has part of its stream already). Such a request is pinned: never granted."""
        self.push_back(request)
        self._items.move_to_end(request.request_id, last=False)
        self._front.add(request.request_id)

    def insert_by_arrival(self, request: Request) -> None:
        """Before every request that arrived after it (ties: after those already here), but never
        ahead of a resumed request at the front."""
        younger: list[str] = []
        for other in reversed(self._items.values()):
            if other.arrival <= request.arrival or other.request_id in self._front:
                break
            younger.append(other.request_id)
        self.push_back(request)
        for request_id in reversed(younger):
            self._items.move_to_end(request_id)

    def grantable(self, after: int = 0) -> list[Request]:
        """The requests a thief could be given, oldest first: not pinned here, and past the first
        ``after`` of the queue (those this node starts itself when the running step ends)."""
        return [r for r in itertools.islice(self._items.values(), after, None) if not r.is_pinned]

    def pop_front(self) -> Request:
        _, request = self._items.popitem(last=False)
        self._front.discard(request.request_id)
        self.total_work -= request.work_tokens
        return request

    def remove(self, request: Request) -> None:
        del self._items[request.request_id]
        self._front.discard(request.request_id)
        self.total_work -= request.work_tokens

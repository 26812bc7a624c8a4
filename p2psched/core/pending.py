"""The pending queue: accepted requests not started yet, in the order the engine takes them.

O(1) push at either end, pop from the front and removal from anywhere (a grant or a cancel
takes requests out of the middle); ``total_work`` is kept up to date so grant sizing and the
published load never walk the queue.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from .request import Request


class PendingQueue:
    def __init__(self) -> None:
        self._items: OrderedDict[str, Request] = OrderedDict()
        self.total_work = 0  # sum of work_tokens: fixed per request while it waits here

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._items.values())

    def from_back(self, skip_head: bool = True) -> Iterator[Request]:
        """Back to front; without the head (the request the engine starts next) by default."""
        remaining = len(self._items) - (1 if skip_head else 0)
        for request in reversed(self._items.values()):
            if remaining <= 0:
                return
            remaining -= 1
            yield request

    def head(self) -> Request | None:
        return next(iter(self._items.values()), None)

    def push_back(self, request: Request) -> None:
        self._items[request.request_id] = request
        self.total_work += request.work_tokens

    def push_front(self, request: Request) -> None:
        self.push_back(request)
        self._items.move_to_end(request.request_id, last=False)

    def pop_front(self) -> Request:
        _, request = self._items.popitem(last=False)
        self.total_work -= request.work_tokens
        return request

    def remove(self, request: Request) -> None:
        del self._items[request.request_id]
        self.total_work -= request.work_tokens

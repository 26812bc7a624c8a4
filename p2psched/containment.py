"""Containment: where outside input meets a long-lived loop, an error stays in that loop.

Each loop of the node (a socket server, a peer reader, the registry, the stealer, the ticker)
handles one input at a time inside ``Containment.guard``: an unexpected exception while
handling it is counted per loop (``p2psched_loop_errors``), logged once per (loop, source) per
minute with its traceback, and the loop goes on to the next input. Input from a client, a
peer or Redis therefore cannot end the node's task group. Cancellation still propagates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager

from .core.stats import Stats

log = logging.getLogger(__name__)

LOG_EVERY_S = 60.0
MAX_KEYS = 10_000


class OncePerMinute:
    """Says yes to the first event per key, then at most once per ``every`` seconds."""

    def __init__(self, every: float = LOG_EVERY_S):
        self._every = every
        self._last: dict[Hashable, float] = {}

    def should_log(self, key: Hashable) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -self._every) < self._every:
            return False
        if len(self._last) >= MAX_KEYS:  # many distinct sources (a scan, a fuzzer): forget, stay bounded
            self._last.clear()
        self._last[key] = now
        return True


class Containment:
    def __init__(self, stats: Stats):
        self._stats = stats
        self._log = OncePerMinute()

    @contextmanager
    def guard(self, loop: str, source: object = "") -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - the boundary: count, log, carry on with the next input
            self.record(loop, source, exc)

    def record(self, loop: str, source: object, exc: BaseException) -> None:
        self._stats.loop_errors[loop] += 1
        if self._log.should_log((loop, repr(source)[:64])):
            log.error("%s: error handling input from %s (contained; the loop goes on): %r", loop,
                      source or "-", exc, exc_info=exc)

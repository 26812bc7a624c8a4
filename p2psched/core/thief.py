"""Thief-side table of stolen-in tasks: sequence numbers, final acks, origin liveness.

For each task the thief runs for another node it numbers the token items it sends (per epoch),
keeps the final item until the origin acknowledges it (retransmitting a few times), lists the
leases to renew by heartbeat, and notices an origin that has gone silent so the thief can
cancel that origin's tasks and free their slots. Pure: the clock is passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .protocol import FinishReason, LeaseRef, Task, TokenItem

MAX_FINAL_RETRANSMITS = 5


@dataclass
class RemoteTask:
    task: Task
    next_seq: int = 0
    completion_tokens: int = 0
    final: TokenItem | None = None
    final_sent_at: float = 0.0
    retransmits: int = 0


class RemoteTasks:
    def __init__(self) -> None:
        self._tasks: dict[str, RemoteTask] = {}
        self._last_heard: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def origins(self) -> set[str]:
        return set(self._last_heard)

    def get(self, request_id: str) -> RemoteTask | None:
        return self._tasks.get(request_id)

    def add(self, task: Task, now: float) -> None:
        self._tasks[task.request_id] = RemoteTask(task, completion_tokens=len(task.delivered_token_ids))
        self._last_heard.setdefault(task.origin_id, now)

    def item_for(self, request_id: str, token_ids: list[int], finish_reason: FinishReason | None,
                 now: float) -> TokenItem | None:
        """Number the next token item of a running task; None if the task is gone."""
        remote = self._tasks.get(request_id)
        if remote is None or remote.final is not None:
            return None
        remote.completion_tokens += len(token_ids)
        item = TokenItem(request_id, remote.task.epoch, remote.next_seq, token_ids, finish_reason,
                         remote.completion_tokens if finish_reason else 0)
        remote.next_seq += 1
        if finish_reason is not None:
            remote.final = item
            remote.final_sent_at = now
        return item

    def heard_from(self, origin_id: str, now: float) -> None:
        if origin_id in self._last_heard:
            self._last_heard[origin_id] = now

    def on_ack(self, origin_id: str, request_ids: list[str], now: float) -> None:
        self.heard_from(origin_id, now)
        for request_id in request_ids:
            remote = self._tasks.get(request_id)
            if remote is not None and remote.task.origin_id == origin_id and remote.final is not None:
                self._remove(request_id)

    def revoke(self, origin_id: str, request_id: str, epoch: int | None = None) -> RemoteTask | None:
        """Origin says stop (cancel or fenced lease). Returns the task if it was still ours."""
        remote = self._tasks.get(request_id)
        if remote is None or remote.task.origin_id != origin_id:
            return None
        if epoch is not None and remote.task.epoch != epoch:
            return None
        self._remove(request_id)
        return remote

    def heartbeats(self, is_running: Callable[[str], bool]) -> dict[str, list[LeaseRef]]:
        """Per origin, the leases still held here (not yet finished), each saying whether the
        engine has started it."""
        out: dict[str, list[LeaseRef]] = {}
        for remote in self._tasks.values():
            if remote.final is None:
                request_id = remote.task.request_id
                out.setdefault(remote.task.origin_id, []).append(
                    LeaseRef(request_id, remote.task.epoch, is_running(request_id)))
        return out

    def retransmits(self, now: float, interval: float) -> tuple[list[tuple[str, TokenItem]], list[RemoteTask]]:
        """(origin, final item) pairs unacknowledged for ``interval`` to send again, and tasks given up on."""
        again: list[tuple[str, TokenItem]] = []
        given_up: list[RemoteTask] = []
        for remote in list(self._tasks.values()):
            if remote.final is None or now - remote.final_sent_at < interval:
                continue
            if remote.retransmits >= MAX_FINAL_RETRANSMITS:
                self._remove(remote.task.request_id)
                given_up.append(remote)
                continue
            remote.retransmits += 1
            remote.final_sent_at = now
            again.append((remote.task.origin_id, remote.final))
        return again, given_up

    def silent_origins(self, now: float, timeout: float) -> list[RemoteTask]:
        """Remove and return the tasks of origins not heard from for ``timeout``."""
        dead = {o for o, t in self._last_heard.items() if now - t >= timeout}
        gone = [r for r in self._tasks.values() if r.task.origin_id in dead]
        for remote in gone:
            self._remove(remote.task.request_id)
        return gone

    def _remove(self, request_id: str) -> None:
        remote = self._tasks.pop(request_id)
        origin = remote.task.origin_id
        if not any(r.task.origin_id == origin for r in self._tasks.values()):
            self._last_heard.pop(origin, None)

"""The node's scheduler core: synchronous, no I/O, the clock passed in.

Events come in as method calls (a client submits, the engine stepped, a peer's message
arrived, time passed); each returns ``Effects``, the instructions the async node carries out
(stream events to clients, hand requests to the engine, send messages to peers). One instance
plays both roles of the protocol:

- origin/victim: own requests wait in ``pending``; thieves take some via ``on_steal``; their
  token streams come back through ``on_tokens`` under leases (see ``leases.py``).
- thief: ``on_grant`` takes tasks, which run here pinned; engine output for them becomes
  ``Tokens`` messages, one per origin per step (see ``thief.py``). A task this node cannot run
  (its engine refuses it, it waited past its deadline, the node is draining) goes back to its
  origin at once in a ``Handback``; the origin runs it or grants it to someone else.

Deadlines (``--scheduler-ttl``, FastDeploy's meaning): a request must *start* running on some
engine within the TTL of its arrival, or its client gets an error. Once an engine admitted it
(here, or on a thief: the thief says so in a heartbeat sent at admission, and its first tokens
say so too) it has no deadline, wherever it runs and however often it is resumed.

Heartbeats vouch for progress: a thief renews its leases only while its engine is stepping
(``tick(..., engine_ok=False)`` sends none), so the origins of a hung engine take their
requests back after one lease timeout.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field

from .. import PROTOCOL_VERSION
from .engine import EngineLimits, EngineOutput, EngineRequest
from .errors import ProtocolError, RequestRejected
from .leases import LeaseTable, Verdict
from .pending import PendingQueue
from .balance import Balancer, StealPlan
from .policy import select_grant
from .protocol import (
    MAX_GRANT_BYTES,
    MAX_ITEMS_PER_MESSAGE,
    MAX_TASKS_PER_GRANT,
    Ack,
    Cancel,
    FinishReason,
    Grant,
    GrantReason,
    Handback,
    HandbackItem,
    HandbackReason,
    Heartbeat,
    HeartbeatAck,
    LeaseRef,
    Message,
    Sampling,
    Steal,
    Task,
    TokenItem,
    Tokens,
    checked_task_frame,
    encode,
)
from .request import Request, State, kv_reservation
from .stats import Stats
from .thief import RemoteTasks

log = logging.getLogger(__name__)

GRANT_OVERHEAD_BYTES = 1024  # a grant's own fields, beside its tasks
ANNOUNCED_WEIGHT = 0.05  # weight of each end in ``announced_share`` (a moving average of about 20)




@dataclass
class ClientEvent:
    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    error: str | None = None
    served_by: str = ""
    attempts: int = 1


@dataclass
class Effects:
    client: list[ClientEvent] = field(default_factory=list)
    engine_add: list[EngineRequest] = field(default_factory=list)
    engine_abort: list[str] = field(default_factory=list)
    to_origin: list[tuple[str, Message]] = field(default_factory=list)  # (origin id, msg)
    to_thief: list[tuple[str, Message]] = field(default_factory=list)  # (thief id, msg)

    def extend(self, other: Effects) -> Effects:
        self.client += other.client
        self.engine_add += other.engine_add
        self.engine_abort += other.engine_abort
        self.to_origin += other.to_origin
        self.to_thief += other.to_thief
        return self


@dataclass(frozen=True)
class SchedulerParams:
    node_id: str
    node_name: str
    model_id: str
    limits: EngineLimits
    ttl: float
    lease_timeout: float
    max_queue_len: int

    @property
    def heartbeat_interval(self) -> float:
        return self.lease_timeout / 3


class Scheduler:
    def __init__(self, params: SchedulerParams, stats: Stats | None = None):
        self.params = params
        self.stats = stats if stats is not None else Stats()
        self.requests: dict[str, Request] = {}
        self.pending = PendingQueue()
        self.running: dict[str, Request] = {}
        self.leases = LeaseTable(params.lease_timeout)
        self.remote = RemoteTasks()
        self.is_accepting_steals = True  # grants its queue to thieves (not once its engine failed)
        self.is_draining = False  # SIGTERM: takes no stolen work, while thieves may still take its queue
        self._reserved_tokens = 0
        self.announced_share = 0.0  # of recent ends, the share announced a step ahead (by max_tokens)
        self.is_engine_ok = True  # as the last tick heard
        self._last_heartbeat = 0.0
        self._deadlines: list[tuple[float, str]] = []  # heap of own requests' deadlines

    # ---- load: published to the registry (for operators) and reported to peers (to steal by) ----

    @property
    def free_slots(self) -> int:
        return self.params.limits.max_num_seqs - len(self.running)

    @property
    def slots_freeing(self) -> int:
        """Running requests that end with the step now running (one token left of their
        ``max_tokens``): slots that free at its end. Requests that stop on EOS free theirs
        unannounced; a stuck engine frees none."""
        return len(self._ending())

    def _ending(self) -> list[Request]:
        """The running requests that end with the step now running (none while the engine is stuck)."""
        if not self.is_engine_ok:
            return []
        return [request for request in self.running.values() if request.remaining_tokens <= 1]

    @property
    def free_kv_tokens(self) -> int:
        return self.params.limits.max_kv_tokens - self._reserved_tokens

    def load(self) -> dict[str, int]:
        return {
            "pending": len(self.pending),
            "pending_tokens": self.pending.total_work,
            "running": len(self.running),
            "free_slots": self.free_slots,
            "free_kv_tokens": self.free_kv_tokens,
        }

    def queue_report(self, now: float) -> tuple[int, float]:
        """(requests a thief could be given, how long the oldest of them has waited; 0 if none).
        Nothing while this node does not grant (its engine failed)."""
        if not self.is_accepting_steals:
            return 0, 0.0
        offered = self.pending.grantable(self.slots_freeing)  # (what starts here within a step does not travel)
        return len(offered), self._waited(offered[0] if offered else None, now)

    def plan_steal(self, balancer: Balancer, now: float) -> StealPlan | None:
        """The steal this node should send now, if any (``balance.Balancer.plan``); none while
        its queue is full (what it took would go straight back)."""
        if len(self.pending) >= self.params.max_queue_len:
            return None
        limits = self.params.limits
        # slots that free with this step and that no request queued ahead (stolen or resumed here,
        # so pinned: they start first) has claimed yet
        ending = self._ending()
        claimed = sum(1 for r in self.pending if r.is_pinned)
        freeing = max(0, len(ending) - claimed)
        freeing_kv = self.free_kv_tokens + sum(self._reservation(r) for r in ending) if freeing else 0
        return balancer.plan(now, self.free_slots, self.free_kv_tokens, len(self.pending),
                             self._waited(self.pending.head(), now), limits.max_kv_tokens, freeing,
                             self.announced_share, freeing_kv)

    @staticmethod
    def _waited(request: Request | None, now: float) -> float:
        return 0.0 if request is None else max(1e-6, now - request.arrival)

    # ---- client side ----

    def _reservation(self, request: Request) -> int:
        """Own requests as this engine reserves them; stolen ones as their victim counted them."""
        cap = None if request.origin_id else self.params.limits.reserve_output_tokens
        return kv_reservation(len(request.prompt_token_ids), request.sampling.max_tokens, cap)

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: Sampling, now: float) -> Request:
        if len(self.pending) >= self.params.max_queue_len:
            raise RequestRejected("the server's queue is full; retry later", 503, "server_overloaded")
        refusal = self.params.limits.refusal(prompt_token_ids, sampling)
        if refusal is not None:
            raise RequestRejected(refusal.message, 400, refusal.code, refusal.param)
        request = Request(request_id, prompt_token_ids, sampling, now, now + self.params.ttl)
        self.requests[request_id] = request
        self.pending.push_back(request)
        heapq.heappush(self._deadlines, (request.deadline, request_id))
        self.stats.received += 1
        return request

    def cancel(self, request_id: str, now: float, reason: str = "client_gone") -> Effects:
        """The client went away: stop the request wherever it is."""
        fx = Effects()
        request = self.requests.get(request_id)
        if request is None or request.is_done or request.origin_id:
            return fx
        self._end(request, State.CANCELLED, fx)
        self.stats.cancelled += 1
        return fx

    # ---- engine side ----

    def admit(self, now: float) -> Effects:
        """Move pending requests into the engine while it has slots and KV room. Origins of
        stolen tasks that start hear it at once (a heartbeat): their deadlines no longer apply."""
        fx = Effects()
        started: dict[str, list[LeaseRef]] = {}
        while self.pending and self.free_slots > 0:
            request = self.pending.head()
            assert request is not None
            if self._reservation(request) > self.free_kv_tokens:
                break
            self.pending.pop_front()
            if request.remaining_tokens == 0:  # resumed after its last token was delivered
                request.transition(State.RUNNING)
                self._finish(request, "length", fx, now)
                continue
            request.transition(State.RUNNING)
            request.has_started = True
            self.running[request.request_id] = request
            self._reserved_tokens += self._reservation(request)
            fx.engine_add.append(EngineRequest(request.request_id, request.prompt_token_ids,
                                               request.sampling, list(request.delivered_token_ids)))
            if request.origin_id:
                started.setdefault(request.origin_id, []).append(LeaseRef(request.request_id, request.epoch, True))
        for origin_id, refs in started.items():
            fx.to_origin.append((origin_id, Heartbeat(PROTOCOL_VERSION, self.params.node_id, refs)))
        return fx

    def on_engine_outputs(self, outputs: list[EngineOutput], busy_s: float, now: float) -> Effects:
        fx = Effects()
        self.stats.busy_s += busy_s
        by_origin: dict[str, list[TokenItem]] = {}
        for out in outputs:
            request = self.running.get(out.request_id)
            if request is None:
                continue  # aborted while the step ran
            if request.origin_id and out.finish_reason == "error" and not out.new_token_ids:
                # The engine refused a stolen task after all: its origin runs it instead.
                self._give_back(fx, request.origin_id, [request], "cannot_run")
                continue
            request.delivered_token_ids += out.new_token_ids
            if out.finish_reason is not None and out.finish_reason != "error":
                announced = 1.0 if out.finish_reason == "length" else 0.0
                self.announced_share += ANNOUNCED_WEIGHT * (announced - self.announced_share)
            if request.origin_id:
                item = self.remote.item_for(request.request_id, out.new_token_ids, out.finish_reason, now)
                if item is not None:
                    by_origin.setdefault(request.origin_id, []).append(item)
                if out.finish_reason is not None:
                    self.stats.stolen_in_completed += 1
                    self._release_running(request)
                    request.transition(State.FINISHED)
                    self.requests.pop(request.request_id, None)
                continue
            request.served_by = self.params.node_name
            if out.finish_reason is not None:
                self._finish(request, out.finish_reason, fx, now, out.new_token_ids)
            else:
                fx.client.append(ClientEvent(request.request_id, out.new_token_ids, served_by=request.served_by))
        for origin_id, items in by_origin.items():
            fx.to_origin.append((origin_id, self._tokens(items)))
            self.stats.token_messages_sent += 1
            self.stats.token_items_forwarded += len(items)
            self.stats.tokens_forwarded += sum(len(item.token_ids) for item in items)
        return fx.extend(self.admit(now))

    def on_engine_failure(self, reason: str) -> Effects:
        """The engine is gone: our own requests fail (their clients get the error); tasks stolen
        from others, started or not, go back to their origins at once, which resume them from the
        tokens they hold, rather than waiting for our heartbeats to stop and the leases to lapse."""
        fx = Effects()
        stolen_in: dict[str, list[Request]] = {}
        for request in list(self.requests.values()):
            if request.is_done:
                continue
            if request.origin_id:
                stolen_in.setdefault(request.origin_id, []).append(request)
            else:
                self._end(request, State.FAILED, fx, error=f"engine failure: {reason}")
        for origin_id, requests in stolen_in.items():
            self._give_back(fx, origin_id, requests, "draining")
        return fx

    # ---- victim side: a thief asks for work ----

    def on_steal(self, steal: Steal, now: float) -> tuple[Grant, bytes]:
        """The grant and its frame. Every task is checked against the protocol and the grant
        against its size cap *before* anything is leased, so a grant that is recorded is one the
        thief decodes whole."""
        reason: GrantReason = "ok"
        chosen: list[tuple[Request, Task]] = []
        kept = self.slots_freeing  # the head of the queue this node starts itself as the step ends
        if not self.is_accepting_steals:
            reason = "not_accepting"
        elif steal.model_id != self.params.model_id:
            reason = "model_mismatch"
        else:
            size = GRANT_OVERHEAD_BYTES
            # select_grant fits every task into the thief's offer at kv_reservation's full form
            for request in select_grant(self.pending.grantable(kept), steal.max_requests, steal.max_tokens, steal.max_model_len,
                                        steal.thief_id, now - steal.min_waited_s):
                task = Task(request.request_id, self.params.node_id, self.params.node_name, request.epoch,
                            request.prompt_token_ids, list(request.delivered_token_ids), request.sampling,
                            request.deadline, max(0.0, now - request.arrival))
                try:
                    task_bytes = len(checked_task_frame(task))
                except ProtocolError as exc:  # cannot happen for a request the HTTP schema accepted
                    log.error("request %s cannot be sent to a peer (%s): it runs here", request.request_id, exc)
                    request.is_pinned = True
                    self.stats.unsendable += 1
                    continue
                if size + task_bytes > MAX_GRANT_BYTES:
                    break
                size += task_bytes
                chosen.append((request, task))
            reason = "ok" if chosen else "empty"
        taken = {request.request_id for request, _ in chosen}
        offered = [r for r in self.pending.grantable(kept) if r.request_id not in taken]
        left = offered[0] if offered else None  # what is left for the next thief
        grantable = len(offered) if self.is_accepting_steals else 0
        oldest = self._waited(left, now) if grantable else 0.0
        grant = Grant(PROTOCOL_VERSION, steal.steal_id, self.params.node_id, [task for _, task in chosen],
                      len(self.pending) - len(chosen), reason, oldest, grantable)
        try:
            frame = encode(grant)
        except ProtocolError as exc:  # nothing is leased yet: answer empty instead
            log.error("grant for %s not sendable (%s): answering empty", steal.thief_name, exc)
            grantable, oldest = self.queue_report(now)
            grant = Grant(PROTOCOL_VERSION, steal.steal_id, self.params.node_id, [], len(self.pending), "empty",
                          oldest, grantable)
            return grant, encode(grant)
        for request, _ in chosen:
            self.pending.remove(request)
            request.transition(State.LEASED)
            self.leases.grant(request.request_id, steal.thief_id, steal.thief_name, request.epoch, now)
        self.stats.stolen_out += len(chosen)
        return grant, frame

    def refuse_steal(self, steal: Steal, reason: GrantReason) -> tuple[Grant, bytes]:
        """An empty grant with a reason the node decided (e.g. the thief is not a registered peer)."""
        grant = Grant(PROTOCOL_VERSION, steal.steal_id, self.params.node_id, [], len(self.pending), reason)
        return grant, encode(grant)

    # ---- thief side: tasks arrive, run, stream back ----

    def on_grant(self, grant: Grant, now: float) -> Effects:
        fx = Effects()
        back: dict[HandbackReason, list[Task]] = {}
        fresh: list[Task] = []
        seen: set[str] = set()
        room = self.params.max_queue_len - len(self.pending)
        for task in grant.tasks:
            if task.request_id in self.requests or task.origin_id != grant.victim_id or task.request_id in seen:
                continue  # a duplicate, or a task the granting node may not hand out: not ours
            seen.add(task.request_id)
            if len(fresh) >= room:
                back.setdefault("full", []).append(task)
                continue
            refusal = self.params.limits.refusal(task.prompt_token_ids, task.sampling, task.delivered_token_ids)
            if self.is_draining or not self.is_accepting_steals:
                back.setdefault("draining", []).append(task)
            elif refusal is not None:
                log.info("handing %s back to %s: %s", task.request_id, task.origin_name, refusal.message)
                back.setdefault("cannot_run", []).append(task)
            elif task.deadline <= now:
                back.setdefault("expired", []).append(task)
            else:
                fresh.append(task)
        for reason, tasks in back.items():
            self._hand_back(fx, grant.victim_id, [(t.request_id, t.epoch) for t in tasks], reason)
        for task in fresh:  # into the queue by how long they have waited (their origin's clock)
            request = Request(task.request_id, list(task.prompt_token_ids), task.sampling, now - task.waited_s,
                              task.deadline, delivered_token_ids=list(task.delivered_token_ids), epoch=task.epoch,
                              is_pinned=True, origin_id=task.origin_id)
            self.requests[task.request_id] = request
            self.pending.insert_by_arrival(request)
            heapq.heappush(self._deadlines, (task.deadline, task.request_id))
            self.remote.add(task, now)
        self.stats.stolen_in += len(fresh)
        return fx.extend(self.admit(now))

    def hand_back_pending(self, reason: HandbackReason) -> Effects:
        """Give every stolen task not started yet back to its origin (the node is draining)."""
        fx = Effects()
        by_origin: dict[str, list[Request]] = {}
        for request in list(self.pending):
            if request.origin_id:
                by_origin.setdefault(request.origin_id, []).append(request)
        for origin_id, requests in by_origin.items():
            self._give_back(fx, origin_id, requests, reason)
        return fx

    def on_ack(self, ack: Ack, now: float) -> None:
        self.remote.on_ack(ack.origin_id, ack.request_ids, now)

    def on_heartbeat_ack(self, ack: HeartbeatAck, now: float) -> Effects:
        self.remote.heard_from(ack.origin_id, now)
        fx = Effects()
        for request_id in ack.revoked:
            if self.remote.revoke(ack.origin_id, request_id) is not None:
                self._drop_stolen_in(request_id, fx)
        return fx

    def on_cancel(self, cancel: Cancel, now: float) -> Effects:
        self.remote.heard_from(cancel.origin_id, now)
        fx = Effects()
        if self.remote.revoke(cancel.origin_id, cancel.request_id, cancel.epoch) is not None:
            self._drop_stolen_in(cancel.request_id, fx)
        return fx

    # ---- origin side: a thief's stream comes back ----

    def on_tokens(self, msg: Tokens, now: float) -> Effects:
        fx = Effects()
        acked: list[str] = []
        for item in msg.items:
            verdict = self.leases.check_tokens(msg.thief_id, item.request_id, item.epoch, item.seq, now)
            request = self.requests.get(item.request_id)
            if verdict is Verdict.ACCEPT and request is not None and request.state is State.LEASED \
                    and not self._fits(request, item.token_ids):
                verdict = Verdict.GAP  # tokens no engine of ours could have made: fence that thief
                self.stats.invalid_items += 1
            if verdict is Verdict.ACCEPT and request is not None and request.state is State.LEASED:
                request.has_started = True
                request.delivered_token_ids += item.token_ids
                request.served_by = msg.thief_name
                if item.finish_reason is not None:
                    self.leases.release(item.request_id, finished=True)
                    self._finish(request, item.finish_reason, fx, now, item.token_ids)
                    acked.append(item.request_id)
                else:
                    fx.client.append(ClientEvent(request.request_id, item.token_ids, served_by=msg.thief_name))
            elif verdict is Verdict.FINISHED:
                acked.append(item.request_id)
            elif verdict is Verdict.DUPLICATE:
                self.stats.duplicate_items += 1
            elif verdict is Verdict.GAP:
                self.stats.stream_gaps += 1
                lease = self.leases.release(item.request_id)
                if lease is not None and request is not None:
                    self._resume(request, lease.thief_id, "stream gap", fx)
            else:
                self.stats.stale_items += 1
                fx.to_thief.append((msg.thief_id, Cancel(PROTOCOL_VERSION, self.params.node_id,
                                                         item.request_id, item.epoch, "stale")))
        if acked:
            fx.to_thief.append((msg.thief_id, Ack(PROTOCOL_VERSION, self.params.node_id, acked)))
        return fx

    def on_heartbeat(self, msg: Heartbeat, now: float) -> Effects:
        revoked: list[str] = []
        for ref in msg.leases:
            if not self.leases.renew(msg.thief_id, ref.request_id, ref.epoch, now):
                revoked.append(ref.request_id)
            elif ref.is_running:
                request = self.requests.get(ref.request_id)
                if request is not None:
                    request.has_started = True
        fx = Effects()
        fx.to_thief.append((msg.thief_id, HeartbeatAck(PROTOCOL_VERSION, self.params.node_id, revoked)))
        return fx

    def on_handback(self, msg: Handback, now: float) -> Effects:
        """A thief gives granted tasks back unrun: run them here (or grant them to another thief);
        one that waited past its deadline fails as timed out."""
        fx = Effects()
        for item in msg.items:
            request = self.requests.get(item.request_id)
            if request is None or request.state is not State.LEASED \
                    or not self.leases.renew(msg.thief_id, item.request_id, item.epoch, now):
                continue  # not this thief's lease (any more): nothing to take back
            self.leases.release(item.request_id)
            self.stats.handbacks_received += 1
            if item.reason == "expired" and request.deadline <= now:  # by our clock, not the thief's
                self._end(request, State.FAILED, fx, error="request timed out waiting to be scheduled")
                continue
            if item.reason == "cannot_run":
                request.refused_by.add(msg.thief_id)
            request.transition(State.PENDING)
            self.pending.insert_by_arrival(request)
        return fx.extend(self.admit(now))

    # ---- time passes ----

    def tick(self, now: float, engine_ok: bool = True) -> Effects:
        """Time passes. ``engine_ok`` is False while this node's engine is stuck in a step: its
        heartbeats then stop vouching for the tasks it runs for others, and no slot of it counts
        as freeing (its queue is offered whole)."""
        self.is_engine_ok = engine_ok
        fx = Effects()
        for lease in self.leases.expired(now):
            request = self.requests.get(lease.request_id)
            self.stats.lease_expiries += 1
            if request is not None and request.state is State.LEASED:
                self._resume(request, lease.thief_id, "lease expired", fx)
        if len(self._deadlines) > 2 * len(self.requests) + 1024:  # finished requests' entries: drop them
            self._deadlines = [(d, r) for d, r in self._deadlines
                               if r in self.requests and not self.requests[r].has_started]
            heapq.heapify(self._deadlines)
        expired: dict[str, list[Request]] = {}
        while self._deadlines and self._deadlines[0][0] <= now:
            _, request_id = heapq.heappop(self._deadlines)
            request = self.requests.get(request_id)
            if request is None or request.has_started or request.state not in (State.PENDING, State.LEASED):
                continue
            grace = request.deadline + self.params.lease_timeout
            if request.state is State.LEASED and not request.origin_id and now < grace:
                # The thief may have started it just now and its heartbeat is on the way: it has a
                # lease timeout to say so (or to hand the task back as expired).
                heapq.heappush(self._deadlines, (grace, request_id))
                continue
            if request.origin_id:  # a stolen task that never started here: its origin fails it
                expired.setdefault(request.origin_id, []).append(request)
            else:
                self._end(request, State.FAILED, fx, error="request timed out waiting to be scheduled")
        for origin_id, requests in expired.items():
            self._give_back(fx, origin_id, requests, "expired")
        if now - self._last_heartbeat >= self.params.heartbeat_interval:
            self._last_heartbeat = now
            if engine_ok:
                for origin_id, refs in self.remote.heartbeats(self._is_running).items():
                    for start in range(0, len(refs), MAX_ITEMS_PER_MESSAGE):
                        fx.to_origin.append((origin_id, Heartbeat(PROTOCOL_VERSION, self.params.node_id,
                                                                  refs[start:start + MAX_ITEMS_PER_MESSAGE])))
            again, given_up = self.remote.retransmits(now, self.params.heartbeat_interval)
            for origin_id, item in again:
                fx.to_origin.append((origin_id, self._tokens([item])))
            for remote in self.remote.silent_origins(now, 2 * self.params.lease_timeout) + given_up:
                if remote.final is None:
                    self.stats.origin_losses += 1
                self._drop_stolen_in(remote.task.request_id, fx)
        return fx.extend(self.admit(now))

    # ---- internals ----

    def _tokens(self, items: list[TokenItem]) -> Tokens:
        return Tokens(PROTOCOL_VERSION, self.params.node_id, self.params.node_name, items)

    def _give_back(self, fx: Effects, origin_id: str, requests: list[Request], reason: HandbackReason) -> None:
        """Hand stolen tasks we hold back to their origin and forget them here."""
        self._hand_back(fx, origin_id, [(r.request_id, r.epoch) for r in requests], reason)
        for request in requests:
            self.remote.revoke(origin_id, request.request_id)
            self._drop_stolen_in(request.request_id, fx)

    def _hand_back(self, fx: Effects, origin_id: str, refs: list[tuple[str, int]], reason: HandbackReason) -> None:
        self.stats.handed_back += len(refs)
        for start in range(0, len(refs), MAX_TASKS_PER_GRANT):  # the protocol's cap per message
            items = [HandbackItem(rid, epoch, reason) for rid, epoch in refs[start:start + MAX_TASKS_PER_GRANT]]
            fx.to_origin.append((origin_id, Handback(PROTOCOL_VERSION, self.params.node_id, items)))

    def _fits(self, request: Request, token_ids: list[int]) -> bool:
        """Token ids a thief sends must be in our vocabulary and within max_tokens."""
        return (len(request.delivered_token_ids) + len(token_ids) <= request.sampling.max_tokens
                and all(t < self.params.limits.vocab_size for t in token_ids))

    def _is_running(self, request_id: str) -> bool:
        request = self.requests.get(request_id)
        return request is not None and request.state is State.RUNNING

    def _resume(self, request: Request, thief_id: str, why: str, fx: Effects) -> None:
        """Fence the thief (new epoch), cancel it best-effort, finish the request here."""
        fx.to_thief.append((thief_id, Cancel(PROTOCOL_VERSION, self.params.node_id, request.request_id,
                                             request.epoch, why)))
        request.epoch += 1
        request.attempts += 1
        request.is_pinned = True
        request.transition(State.PENDING)
        self.pending.push_front(request)
        self.stats.resumed += 1

    def _release_running(self, request: Request) -> None:
        if self.running.pop(request.request_id, None) is not None:
            self._reserved_tokens -= self._reservation(request)

    def _drop_stolen_in(self, request_id: str, fx: Effects) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        if request.state is State.RUNNING:
            self._release_running(request)
            fx.engine_abort.append(request_id)
        elif request.state is State.PENDING:
            self.pending.remove(request)
        if not request.is_done:
            request.transition(State.CANCELLED)

    def _finish(self, request: Request, reason: FinishReason, fx: Effects, now: float,
                last_tokens: list[int] | None = None) -> None:
        if request.state is State.RUNNING:
            self._release_running(request)
            self.stats.ran_locally += 1
        request.transition(State.FINISHED)
        self.requests.pop(request.request_id, None)
        self.stats.completed += 1
        fx.client.append(ClientEvent(request.request_id, list(last_tokens or []), reason,
                                     served_by=request.served_by or self.params.node_name,
                                     attempts=request.attempts))

    def _end(self, request: Request, state: State, fx: Effects, error: str | None = None) -> None:
        """Cancel or fail a live request wherever it is."""
        if request.state is State.PENDING:
            self.pending.remove(request)
        elif request.state is State.RUNNING:
            self._release_running(request)
            fx.engine_abort.append(request.request_id)
        elif request.state is State.LEASED:
            lease = self.leases.release(request.request_id)
            if lease is not None:
                fx.to_thief.append((lease.thief_id, Cancel(PROTOCOL_VERSION, self.params.node_id,
                                                           request.request_id, request.epoch, state.value)))
        request.transition(state)
        self.requests.pop(request.request_id, None)
        if request.origin_id:
            return
        if state is State.FAILED:
            self.stats.failed += 1
        fx.client.append(ClientEvent(request.request_id, [], error=error or state.value,
                                     served_by=request.served_by, attempts=request.attempts))

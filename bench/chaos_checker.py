"""The chaos suite's checker: per-request records, the fault log and the nodes' gauges in,
verdicts out. Pure: no clock, no sockets (``tests/unit/test_chaos_checker.py``).

What must hold after a chaos run:

- every accepted request (HTTP 200) completes exactly once (one final chunk, then ``[DONE]``)
  with exactly the tokens of a fault-free run: no token twice, none missing, none different;
- or its client gets an explicit error (an error event, an error status, or the connection
  dropped) *because its own origin died*: the node it talked to was killed (kill -9) between
  the moment the request was sent and the moment the client saw the error. Tokens it received
  before the error must still be a duplicate-free, gap-free prefix;
- after quiesce, every live node reports 0 on each gauge of ``LEAK_GAUGES`` (no slot, KV
  reservation, lease, stolen-in task or in-flight request left behind);
- no node ran a request longer than its context (``contexts``, by node name): a request over
  its origin's context must be refused at the door (HTTP 400 ``context_length_exceeded``: legal,
  counted apart), and no thief may serve a token of a request over its own context;
- the TTL (``--scheduler-ttl``) bounds only the wait before a request first starts: an error
  "timed out waiting" is legal only for a request that got no token and whose client waited at
  least the TTL; once a request streams, it completes however long it runs, stolen or resumed;
- a thief whose engine hangs (an observed engine stall) stops vouching for its leases: a stolen
  request it was streaming when the stall began, and that had not finished by the time its
  lease must have lapsed (two lease timeouts in), must end under a later attempt (its final
  chunk says attempts >= 2), unless its origin was frozen or killed meanwhile.

What the nodes were configured with comes in as ``Rules`` (contexts, TTL, lease timeout).

Token streams are aligned against the expected tokens position by position, so a failure is
named: *duplicated* (a token at a position already delivered), *missing* (a jump ahead: a
gap, or a stream that ended early), *wrong* (a token that is nowhere in the expected output,
or a bad ending).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

STALL_THIEF = "engine_stall_thief"
# Faults that stop an origin from taking a lease back (its ticker does not run, or it is gone).
ORIGIN_FROZEN_KINDS = ("kill9_thief", "kill9_origin", "sigstop_thief", "sigstop_origin")
LAPSE_SLACK_S = 0.5  # after two lease timeouts, how long an origin's ticker may take to notice

# Gauges that must read 0 on every live node after quiesce.
LEAK_GAUGES = ("p2psched_requests_in_flight", "p2psched_leases_held", "p2psched_stolen_in_active",
               "p2psched_scheduler_requests", "p2psched_queue_length", "p2psched_running_sequences",
               "p2psched_kv_reserved_ratio")
OPTIONAL_LEAK_GAUGES = ("p2psched_kv_blocks_used",)  # the real engine only

# Outcomes the driver records, as the client saw them.
COMPLETED = "completed"  # a final chunk and [DONE]
ERROR_EVENT = "error_event"  # a `data: {"error": ...}` event
DROPPED = "dropped"  # the connection closed or reset mid-stream (or before any response)
REJECTED = "rejected"  # an HTTP status other than 200
NOT_ACCEPTED = "not_accepted"  # no connection to any node (they were down): never accepted
HUNG = "hung"  # still open when the driver gave up waiting
ENDED_EARLY = "ended_early"  # [DONE] or end of body without a final chunk
TTL_ERROR = "timed out waiting to be scheduled"  # what a node says when a request's TTL ran out
CONTEXT_ERROR = "context_length_exceeded"  # the error code of a request over the node's context

# Verdicts.
EXACT = "exact"
ORIGIN_DIED = "origin_died"
UNACCEPTED = "not_accepted"
REFUSED_OVER_CONTEXT = "refused_over_context"  # 400 from an origin whose context it exceeds: right
TIMED_OUT_WAITING = "timed_out_waiting"  # never started within the TTL (the client waited that long)
LOST = "lost"
DUPLICATED = "duplicated"
MISSING = "missing"
WRONG = "wrong"
OVER_CONTEXT = "over_context"  # accepted by an origin, or served by a thief, whose context it exceeds
HELD_THROUGH_STALL = "held_through_stall"  # a hung thief kept vouching: its lease never lapsed
FAILURES = (LOST, DUPLICATED, MISSING, WRONG, OVER_CONTEXT, HELD_THROUGH_STALL)


@dataclass
class Chunk:
    t: float  # driver clock, seconds
    token_ids: list[int]
    finish_reason: str | None = None
    served_by: str | None = None  # present when the serving node changed, and on the last chunk
    attempts: int | None = None


@dataclass
class RequestRecord:
    index: int
    origin: str  # the node the client talked to
    expected: list[int]  # the tokens of a fault-free run
    sent_at: float
    outcome: str
    accepted_at: float | None = None  # when the 200 arrived
    ended_at: float | None = None
    chunks: list[Chunk] = field(default_factory=list)
    saw_done: bool = False
    status: int = 0  # HTTP status, 0 when none came
    error: str = ""
    expected_finish: str = "length"
    context_tokens: int = 0  # prompt + max_tokens (0: unknown, no context check)
    is_door_probe: bool = False  # sent on purpose to a node whose context it exceeds

    @property
    def tokens(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk.token_ids]

    @property
    def first_token_at(self) -> float | None:
        return next((c.t for c in self.chunks if c.token_ids), None)

    def chunk_servers(self) -> list[str | None]:
        """The node each chunk came from: ``served_by`` is named only when it changes (and on the
        last chunk), so it carries forward."""
        current: str | None = None
        found: list[str | None] = []
        for chunk in self.chunks:
            current = chunk.served_by or current
            found.append(current)
        return found

    def thieves(self) -> list[str]:
        """The nodes other than its origin that served some of its tokens, in order."""
        names: list[str] = []
        for name in self.chunk_servers():
            if name and name != self.origin and name not in names:
                names.append(name)
        return names


@dataclass
class FaultEvent:
    """A fault that fired (skipped ones are not logged)."""

    fault_id: int
    kind: str
    node: str | None  # the node hit; None for Redis faults
    at: float  # driver clock
    until: float  # when it was over (SIGCONT sent, Redis back, link healed, node restarted)
    detail: str = ""
    point: str = ""  # node faults: prefill, mid_decode or before_last
    observed: bool = True  # engine stalls: /health said engine_stalled (the engine really hung)

    @property
    def label(self) -> str:
        return f"{self.kind}@{self.point}" if self.point else self.kind


@dataclass(frozen=True)
class Rules:
    """What the nodes were configured with, that the checker holds them to. None: not checked."""

    contexts: Mapping[str, int] | None = None  # node name -> context length (--sim-max-model-len)
    ttl_s: float | None = None  # --scheduler-ttl
    lease_timeout_s: float | None = None  # --lease-timeout


@dataclass
class Alignment:
    duplicated: int = 0  # tokens at positions already delivered
    missing: int = 0  # positions skipped (or never reached, for a completed stream)
    wrong: int = 0  # tokens found nowhere ahead or behind
    delivered: int = 0  # expected positions covered (wrong tokens included), in order


@dataclass
class RequestVerdict:
    index: int
    status: str
    detail: str = ""
    duplicated_tokens: int = 0
    missing_tokens: int = 0


@dataclass
class Leak:
    node: str
    gauge: str
    value: float | None  # None: the node could not be read, or did not report the gauge


@dataclass
class Report:
    sent: int = 0
    accepted: int = 0
    completed_exactly: int = 0
    errored_origin_died: int = 0
    not_accepted: int = 0
    lost: int = 0
    duplicated: int = 0  # requests with duplicated tokens
    missing: int = 0  # requests with missing tokens
    wrong: int = 0
    over_context: int = 0  # requests accepted or stolen by a node whose context they exceed
    held_through_stall: int = 0  # stolen requests a hung thief kept (its heartbeats vouched for it)
    taken_from_stalled: int = 0  # stolen requests taken back from a hung thief, as they must be
    duplicated_tokens: int = 0
    missing_tokens: int = 0
    refused_over_context: int = 0  # door probes answered 400 context_length_exceeded (right)
    timed_out_waiting: int = 0  # legal TTL errors: no token, and the client waited at least the TTL
    ttl_s: float | None = None
    max_wait_s: float = 0.0  # longest wait, send to first token, of a request that got one (client clock)
    started_after_ttl: int = 0  # requests whose first token came later than the TTL after sending (legal)
    stolen_past_ttl: int = 0  # exact requests that a thief was still streaming after the TTL had passed
    resumed_past_ttl: int = 0  # exact requests resumed (attempts > 1) after the TTL had passed
    stolen_by: dict[str, int] = field(default_factory=dict)  # thief -> requests it served tokens of
    largest_stolen: dict[str, int] = field(default_factory=dict)  # thief -> largest context it served
    leaks: list[Leak] = field(default_factory=list)
    faults_by_kind: dict[str, int] = field(default_factory=dict)
    faults_injected: int = 0
    failures: list[RequestVerdict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.missing or self.wrong or self.over_context
                    or self.held_through_stall or self.leaks)


def align(chunks: Iterable[list[int]], expected: list[int]) -> Alignment:
    """Walk the received tokens against ``expected``. A token that matches the next expected
    position advances; otherwise it is placed at the nearest earlier position holding it (a
    duplicate), else the nearest later one (a gap: the positions jumped over are missing), else
    it is wrong and takes the expected position's place."""
    result = Alignment()
    positions: dict[int, list[int]] = {}
    for i, token in enumerate(expected):
        positions.setdefault(token, []).append(i)
    pos = 0
    for chunk in chunks:
        for token in chunk:
            if pos < len(expected) and expected[pos] == token:
                pos += 1
                continue
            where = positions.get(token, [])
            before = [i for i in where if i < pos]
            after = [i for i in where if i > pos]
            if before:
                result.duplicated += 1
            elif after:
                result.missing += after[0] - pos
                pos = after[0] + 1
            else:
                result.wrong += 1  # read as a substitution: it stands where the expected token was
                pos += 1
    result.delivered = pos
    return result


def origin_killed(record: RequestRecord, faults: Iterable[FaultEvent]) -> FaultEvent | None:
    """The kill -9 of the request's origin while the request was in flight, if any."""
    end = record.ended_at if record.ended_at is not None else float("inf")
    for fault in faults:
        if fault.kind.startswith("kill9") and fault.node == record.origin and record.sent_at <= fault.at <= end:
            return fault
    return None


def over_context(record: RequestRecord, contexts: Mapping[str, int]) -> RequestVerdict | None:
    """A node that took on a request longer than its context: the origin (it should have said
    400) or a thief (the victim should not have granted it). None when every node fit it."""
    need = record.context_tokens
    limit = contexts.get(record.origin)
    if need and limit is not None and need > limit and record.accepted_at is not None:
        return RequestVerdict(record.index, OVER_CONTEXT, f"origin {record.origin} (context {limit}) accepted a "
                                                          f"request of {need} tokens")
    for thief in record.thieves():
        limit = contexts.get(thief)
        if need and limit is not None and need > limit:
            return RequestVerdict(record.index, OVER_CONTEXT, f"stolen by {thief} (context {limit}): {need} tokens")
    return None


def stalls_spanned(record: RequestRecord, faults: Iterable[FaultEvent], lease_timeout_s: float
                   ) -> list[tuple[FaultEvent, bool]]:
    """The observed thief stalls this request lived through on that thief, each with whether it
    was taken back: it was streaming from the stalled thief (a chunk from it at or before the
    stall), its origin is another node that was neither frozen nor killed until the lease must
    have lapsed, and it had not finished by then. Taken back = its final chunk counts a later
    attempt (the origin bumped the epoch: resumed it, or granted it again)."""
    servers = record.chunk_servers()
    if not record.chunks or record.chunks[-1].finish_reason is None:
        return []
    lapse_s = 2 * lease_timeout_s + LAPSE_SLACK_S  # heartbeats stop one lease timeout in, the lease lapses one later
    found: list[tuple[FaultEvent, bool]] = []
    for fault in faults:
        if fault.kind != STALL_THIEF or not fault.observed or fault.node is None or fault.node == record.origin:
            continue
        lapsed_by = fault.at + lapse_s
        was_streaming = any(s == fault.node and c.t <= fault.at for c, s in zip(record.chunks, servers))
        origin_frozen = any(f.node == record.origin and f.kind in ORIGIN_FROZEN_KINDS and f.at <= lapsed_by
                            and f.until >= fault.at for f in faults)
        if was_streaming and not origin_frozen and record.chunks[-1].t > lapsed_by:
            found.append((fault, (record.chunks[-1].attempts or 1) > 1))
    return found


def judge(record: RequestRecord, faults: list[FaultEvent], rules: Rules | None = None) -> RequestVerdict:
    """One request's verdict under ``rules`` (default: no context, TTL or stall rules)."""
    rules = rules or Rules()
    contexts, ttl_s = rules.contexts, rules.ttl_s
    if record.outcome == NOT_ACCEPTED:
        return RequestVerdict(record.index, UNACCEPTED, record.error)
    if contexts is not None:
        limit = contexts.get(record.origin)
        if record.status == 400 and limit is not None and record.context_tokens > limit \
                and CONTEXT_ERROR in record.error:
            return RequestVerdict(record.index, REFUSED_OVER_CONTEXT, f"{record.context_tokens} tokens > {limit}")
        too_long = over_context(record, contexts)
        if too_long is not None:
            return too_long
    got = align((c.token_ids for c in record.chunks), record.expected)
    finals = [k for k, c in enumerate(record.chunks) if c.finish_reason is not None]
    killed = origin_killed(record, faults)
    # The final chunk arrived, then the origin died before [DONE]: the client has it all.
    is_done_waived = record.outcome != COMPLETED and bool(finals) and killed is not None
    if record.outcome == COMPLETED or is_done_waived:
        missing = got.missing + (len(record.expected) - got.delivered)
        problems = []
        if len(finals) != 1 or finals[0] != len(record.chunks) - 1:
            problems.append(f"{len(finals)} final chunk(s), the last at chunk {finals[-1] if finals else '-'} "
                            f"of {len(record.chunks)}")
        if finals and record.chunks[finals[-1]].finish_reason != record.expected_finish:
            problems.append(f"finish_reason {record.chunks[finals[-1]].finish_reason!r}, "
                            f"expected {record.expected_finish!r}")
        if not record.saw_done and not is_done_waived:
            problems.append("no [DONE]")
        summary = (f"{len(record.tokens)} tokens for {len(record.expected)} expected: "
                   f"{got.duplicated} duplicated, {missing} missing, {got.wrong} wrong")
        if got.duplicated:
            return RequestVerdict(record.index, DUPLICATED, summary, got.duplicated, missing)
        if missing:
            return RequestVerdict(record.index, MISSING, summary, 0, missing)
        if got.wrong or problems:
            return RequestVerdict(record.index, WRONG, "; ".join([summary, *problems]))
        if rules.lease_timeout_s is not None:
            kept = [f for f, taken in stalls_spanned(record, faults, rules.lease_timeout_s) if not taken]
            if kept:
                return RequestVerdict(record.index, HELD_THROUGH_STALL,
                                      f"{kept[0].node} kept it through its engine stall (fault #{kept[0].fault_id} "
                                      f"at {kept[0].at:.2f}s): it ended at {record.chunks[-1].t:.2f}s on its first "
                                      "attempt, so the hung thief's lease never lapsed")
        return RequestVerdict(record.index, EXACT)
    # Not completed: excused only by the death of its own origin, and only with a clean prefix.
    prefix = f"{got.delivered} of {len(record.expected)} tokens before it ended"
    if got.duplicated:
        return RequestVerdict(record.index, DUPLICATED, f"{record.outcome}; {prefix}, {got.duplicated} duplicated",
                              got.duplicated, got.missing)
    if got.missing:
        return RequestVerdict(record.index, MISSING, f"{record.outcome}; {prefix}, {got.missing} skipped",
                              0, got.missing)
    if got.wrong or finals:
        return RequestVerdict(record.index, WRONG, f"{record.outcome}; {prefix}, {got.wrong} wrong, "
                                                   f"{len(finals)} final chunk(s)")
    if TTL_ERROR in record.error and not record.tokens and record.ended_at is not None:
        waited = record.ended_at - record.sent_at
        if ttl_s is not None and waited >= ttl_s:
            return RequestVerdict(record.index, TIMED_OUT_WAITING, f"no token after {waited:.2f}s (TTL {ttl_s:g}s)")
        return RequestVerdict(record.index, LOST, f"timed out waiting after only {waited:.2f}s, under the TTL "
                                                  f"({ttl_s}s): {record.error}")
    if killed is not None:
        return RequestVerdict(record.index, ORIGIN_DIED,
                              f"{record.outcome} after origin {record.origin} was killed (fault #{killed.fault_id})")
    reason = f": {record.error}" if record.error else ""
    status = f" (HTTP {record.status})" if record.status else ""
    return RequestVerdict(record.index, LOST, f"{record.outcome}{status}{reason}; {prefix}; origin "
                                              f"{record.origin} was not killed while it was in flight")


def leaks(gauges: Mapping[str, Mapping[str, float] | None]) -> list[Leak]:
    """Non-zero (or unreadable) leak gauges, per live node. ``None`` = the node did not answer."""
    found: list[Leak] = []
    for node, values in sorted(gauges.items()):
        if values is None:
            found.append(Leak(node, "unreachable", None))
            continue
        for gauge in LEAK_GAUGES:
            if gauge not in values:
                found.append(Leak(node, gauge, None))
            elif values[gauge] != 0:
                found.append(Leak(node, gauge, values[gauge]))
        for gauge in OPTIONAL_LEAK_GAUGES:
            if values.get(gauge, 0) != 0:
                found.append(Leak(node, gauge, values[gauge]))
    return found


def _observe_ttl(report: Report, record: RequestRecord, ttl_s: float | None) -> None:
    """What the TTL meant for an exact request: how long it waited, whether a thief streamed it
    (or it was resumed) after the TTL had passed."""
    first = record.first_token_at
    if first is None:
        return
    report.max_wait_s = max(report.max_wait_s, first - record.sent_at)
    if ttl_s is None:
        return
    late = record.sent_at + ttl_s
    report.started_after_ttl += first > late
    servers = record.chunk_servers()
    report.stolen_past_ttl += any(c.t > late and server and server != record.origin
                                  for c, server in zip(record.chunks, servers))
    resumed_at = next((c.t for c in record.chunks if (c.attempts or 1) > 1), None)
    report.resumed_past_ttl += resumed_at is not None and resumed_at > late


def check(records: list[RequestRecord], faults: list[FaultEvent], gauges: Mapping[str, Mapping[str, float] | None],
          rules: Rules | None = None) -> Report:
    """Every record judged (see ``judge``), the gauges read for leaks, and the counts of a summary."""
    rules = rules or Rules()
    ttl_s = rules.ttl_s
    report = Report(sent=len(records), faults_injected=len(faults), ttl_s=ttl_s,
                    faults_by_kind=dict(sorted(Counter(f.label for f in faults).items())))
    counters = {LOST: "lost", DUPLICATED: "duplicated", MISSING: "missing", WRONG: "wrong",
                OVER_CONTEXT: "over_context", HELD_THROUGH_STALL: "held_through_stall"}
    for record in records:
        verdict = judge(record, faults, rules)
        if record.accepted_at is not None:
            report.accepted += 1
        for thief in record.thieves():
            report.stolen_by[thief] = report.stolen_by.get(thief, 0) + 1
            report.largest_stolen[thief] = max(report.largest_stolen.get(thief, 0), record.context_tokens)
        if verdict.status == EXACT:
            report.completed_exactly += 1
            _observe_ttl(report, record, ttl_s)
            if rules.lease_timeout_s is not None:
                report.taken_from_stalled += len(stalls_spanned(record, faults, rules.lease_timeout_s))
        elif verdict.status == ORIGIN_DIED:
            report.errored_origin_died += 1
        elif verdict.status == UNACCEPTED:
            report.not_accepted += 1
        elif verdict.status == REFUSED_OVER_CONTEXT:
            report.refused_over_context += 1
        elif verdict.status == TIMED_OUT_WAITING:
            report.timed_out_waiting += 1
        else:
            report.failures.append(verdict)
            name = counters[verdict.status]
            setattr(report, name, getattr(report, name) + 1)
        report.duplicated_tokens += verdict.duplicated_tokens
        report.missing_tokens += verdict.missing_tokens
    report.stolen_by = dict(sorted(report.stolen_by.items()))
    report.largest_stolen = dict(sorted(report.largest_stolen.items()))
    report.leaks = leaks(gauges)
    return report

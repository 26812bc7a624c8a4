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
  reservation, lease, stolen-in task or in-flight request left behind).

Token streams are aligned against the expected tokens position by position, so a failure is
named: *duplicated* (a token at a position already delivered), *missing* (a jump ahead: a
gap, or a stream that ended early), *wrong* (a token that is nowhere in the expected output,
or a bad ending).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

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

# Verdicts.
EXACT = "exact"
ORIGIN_DIED = "origin_died"
UNACCEPTED = "not_accepted"
LOST = "lost"
DUPLICATED = "duplicated"
MISSING = "missing"
WRONG = "wrong"
FAILURES = (LOST, DUPLICATED, MISSING, WRONG)


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

    @property
    def tokens(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk.token_ids]


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

    @property
    def label(self) -> str:
        return f"{self.kind}@{self.point}" if self.point else self.kind


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
    duplicated_tokens: int = 0
    missing_tokens: int = 0
    leaks: list[Leak] = field(default_factory=list)
    faults_by_kind: dict[str, int] = field(default_factory=dict)
    faults_injected: int = 0
    failures: list[RequestVerdict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.missing or self.wrong or self.leaks)


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


def judge(record: RequestRecord, faults: list[FaultEvent]) -> RequestVerdict:
    if record.outcome == NOT_ACCEPTED:
        return RequestVerdict(record.index, UNACCEPTED, record.error)
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


def check(records: list[RequestRecord], faults: list[FaultEvent],
          gauges: Mapping[str, Mapping[str, float] | None]) -> Report:
    report = Report(sent=len(records), faults_injected=len(faults),
                    faults_by_kind=dict(sorted(Counter(f.label for f in faults).items())))
    for record in records:
        verdict = judge(record, faults)
        if record.accepted_at is not None:
            report.accepted += 1
        if verdict.status == EXACT:
            report.completed_exactly += 1
        elif verdict.status == ORIGIN_DIED:
            report.errored_origin_died += 1
        elif verdict.status == UNACCEPTED:
            report.not_accepted += 1
        else:
            report.failures.append(verdict)
            if verdict.status == LOST:
                report.lost += 1
            elif verdict.status == DUPLICATED:
                report.duplicated += 1
            elif verdict.status == MISSING:
                report.missing += 1
            else:
                report.wrong += 1
        report.duplicated_tokens += verdict.duplicated_tokens
        report.missing_tokens += verdict.missing_tokens
    report.leaks = leaks(gauges)
    return report

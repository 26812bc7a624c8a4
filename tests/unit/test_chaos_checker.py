"""The chaos checker on synthetic records: it must pass clean runs and name every kind of failure."""

from __future__ import annotations

from bench.chaos_checker import (
    COMPLETED,
    DROPPED,
    DUPLICATED,
    ERROR_EVENT,
    EXACT,
    HELD_THROUGH_STALL,
    HUNG,
    LEAK_GAUGES,
    LOST,
    MISSING,
    NOT_ACCEPTED,
    ORIGIN_DIED,
    OVER_CONTEXT,
    REFUSED_OVER_CONTEXT,
    REJECTED,
    TIMED_OUT_WAITING,
    TTL_ERROR,
    UNACCEPTED,
    WRONG,
    Chunk,
    FaultEvent,
    Leak,
    RequestRecord,
    Rules,
    align,
    check,
    judge,
    leaks,
)

EXPECTED = [101, 102, 103, 104, 105, 106]
CLEAN_GAUGES = {"node0": {g: 0.0 for g in LEAK_GAUGES}, "node1": {g: 0.0 for g in LEAK_GAUGES}}


def completed(index: int, *token_chunks: list[int], origin: str = "node0", finish: str = "length",
              saw_done: bool = True) -> RequestRecord:
    chunks = [Chunk(1.0 + k, list(ids)) for k, ids in enumerate(token_chunks)]
    chunks[-1].finish_reason = finish
    chunks[0].served_by = origin
    return RequestRecord(index, origin, list(EXPECTED), sent_at=0.5, outcome=COMPLETED, accepted_at=0.6,
                         ended_at=1.0 + len(chunks), chunks=chunks, saw_done=saw_done)


def broken(index: int, outcome: str, *token_chunks: list[int], origin: str = "node0",
           ended_at: float = 5.0) -> RequestRecord:
    chunks = [Chunk(1.0 + k, list(ids)) for k, ids in enumerate(token_chunks)]
    return RequestRecord(index, origin, list(EXPECTED), sent_at=0.5, outcome=outcome, accepted_at=0.6,
                         ended_at=ended_at, chunks=chunks, error="boom")


def kill(node: str, at: float, fault_id: int = 0) -> FaultEvent:
    return FaultEvent(fault_id, "kill9_origin", node, at, at + 1.0)


def test_a_clean_run_passes_with_chunks_of_any_size() -> None:
    records = [completed(0, [101], [102, 103], [104], [105, 106]), completed(1, EXPECTED)]
    report = check(records, [], CLEAN_GAUGES)
    assert report.ok
    assert (report.sent, report.accepted, report.completed_exactly) == (2, 2, 2)
    assert report.failures == []


def test_a_duplicated_token_is_caught() -> None:
    record = completed(0, [101, 102, 103], [103, 104], [105, 106])  # 103 delivered twice (resume replayed it)
    verdict = judge(record, [])
    assert verdict.status == DUPLICATED and verdict.duplicated_tokens == 1
    report = check([record], [], CLEAN_GAUGES)
    assert not report.ok and report.duplicated == 1 and report.duplicated_tokens == 1


def test_a_gap_is_caught() -> None:
    record = completed(0, [101, 102], [105, 106])  # 103 and 104 never arrived
    verdict = judge(record, [])
    assert verdict.status == MISSING and verdict.missing_tokens == 2
    report = check([record], [], CLEAN_GAUGES)
    assert not report.ok and report.missing == 1 and report.missing_tokens == 2


def test_a_stream_that_finishes_short_is_missing_tokens() -> None:
    verdict = judge(completed(0, [101, 102, 103, 104]), [])
    assert verdict.status == MISSING and verdict.missing_tokens == 2


def test_wrong_tokens_a_second_final_chunk_and_no_done_are_caught() -> None:
    assert judge(completed(0, [101, 102, 999, 104, 105, 106]), []).status == WRONG
    twice = completed(0, [101, 102, 103], [104, 105, 106])
    twice.chunks[0].finish_reason = "length"
    assert judge(twice, []).status == WRONG
    assert judge(completed(0, EXPECTED, saw_done=False), []).status == WRONG
    assert judge(completed(0, EXPECTED, finish="stop"), []).status == WRONG


def test_a_lost_request_is_caught() -> None:
    hung = broken(0, HUNG, [101, 102])
    report = check([hung], [], CLEAN_GAUGES)
    assert not report.ok and report.lost == 1 and report.failures[0].status == LOST


def test_an_error_whose_origin_did_not_die_is_lost() -> None:
    records = [broken(0, ERROR_EVENT, [101]), broken(1, DROPPED, [101, 102], origin="node1"),
               broken(2, REJECTED)]
    faults = [kill("node0", at=6.0),  # after request 0 ended: not its cause
              kill("node2", at=2.0)]  # another node
    report = check(records, faults, CLEAN_GAUGES)
    assert [v.status for v in report.failures] == [LOST, LOST, LOST]
    assert report.lost == 3 and report.errored_origin_died == 0 and not report.ok


def test_an_error_because_the_origin_was_killed_is_excused() -> None:
    records = [broken(0, DROPPED, [101, 102]), broken(1, ERROR_EVENT), completed(2, EXPECTED)]
    report = check(records, [kill("node0", at=3.0)], CLEAN_GAUGES)
    assert report.ok
    assert (report.errored_origin_died, report.completed_exactly, report.faults_injected) == (2, 1, 1)
    assert report.faults_by_kind == {"kill9_origin": 1}


def test_an_excused_error_still_needs_a_clean_prefix() -> None:
    record = broken(0, DROPPED, [101, 102], [102])
    assert judge(record, [kill("node0", at=3.0)]).status == DUPLICATED


def test_never_accepted_is_neither_a_success_nor_a_failure() -> None:
    record = RequestRecord(0, "node3", list(EXPECTED), 0.5, NOT_ACCEPTED, error="connection refused")
    report = check([record], [], CLEAN_GAUGES)
    assert report.ok and report.not_accepted == 1 and report.accepted == 0
    assert judge(record, []).status == UNACCEPTED


def test_leaks_are_reported_per_node_and_gauge() -> None:
    gauges = {"node0": {**{g: 0.0 for g in LEAK_GAUGES}, "p2psched_leases_held": 2.0,
                        "p2psched_kv_reserved_ratio": 0.01, "p2psched_kv_blocks_used": 3.0},
              "node1": {g: 0.0 for g in LEAK_GAUGES if g != "p2psched_queue_length"},
              "node2": None}
    found = leaks(gauges)
    assert found == [Leak("node0", "p2psched_leases_held", 2.0), Leak("node0", "p2psched_kv_reserved_ratio", 0.01),
                     Leak("node0", "p2psched_kv_blocks_used", 3.0), Leak("node1", "p2psched_queue_length", None),
                     Leak("node2", "unreachable", None)]
    report = check([completed(0, EXPECTED)], [], gauges)
    assert not report.ok and report.completed_exactly == 1


def test_align_names_positions() -> None:
    got = align([[101, 102], [101], [104, 105, 106]], EXPECTED)
    assert (got.duplicated, got.missing, got.wrong, got.delivered) == (1, 1, 0, 6)
    assert judge(completed(0, EXPECTED), []).status == EXACT
    assert judge(broken(0, DROPPED, [101], ended_at=2.0), [kill("node0", at=1.5)]).status == ORIGIN_DIED


def test_a_final_chunk_then_the_origin_killed_before_done_is_complete() -> None:
    record = completed(0, EXPECTED, saw_done=False)
    record.outcome = DROPPED
    assert judge(record, [kill("node0", at=1.5)]).status == EXACT
    assert judge(record, []).status == WRONG  # without the kill, a missing [DONE] is the node's fault


# ---- heterogeneous contexts: the door, and what thieves may take ----

CONTEXTS = {"node0": 4096, "node1": 4096, "node3": 1024}
REFUSAL_BODY = ('{"error": {"message": "prompt (1300 tokens) plus max_tokens (200) exceed the context length 1024", '
                '"type": "invalid_request_error", "param": "prompt", "code": "context_length_exceeded"}}')


def refused(index: int, origin: str, context_tokens: int, body: str = REFUSAL_BODY) -> RequestRecord:
    return RequestRecord(index, origin, list(EXPECTED), sent_at=0.5, outcome=REJECTED, ended_at=0.6, status=400,
                         error=body, context_tokens=context_tokens, is_door_probe=True)


def test_a_door_probe_refused_with_400_is_counted_apart_and_legal() -> None:
    report = check([refused(0, "node3", 1500), completed(1, EXPECTED)], [], CLEAN_GAUGES, Rules(CONTEXTS))
    assert report.ok and report.failures == []
    assert (report.refused_over_context, report.accepted, report.completed_exactly) == (1, 1, 1)
    assert judge(refused(0, "node3", 1500), [], Rules(CONTEXTS)).status == REFUSED_OVER_CONTEXT


def test_a_400_is_legal_only_over_the_origins_context_and_for_the_context_error() -> None:
    assert judge(refused(0, "node3", 1000), [], Rules(CONTEXTS)).status == LOST  # it fit: the 400 was wrong
    assert judge(refused(0, "node0", 1500), [], Rules(CONTEXTS)).status == LOST  # node0 holds 4096
    other = refused(0, "node3", 1500, body='{"error": {"message": "max_tokens must be at most 1", "code": null}}')
    assert judge(other, [], Rules(CONTEXTS)).status == LOST  # over the context, but refused for something else
    assert judge(refused(0, "node3", 1500), []).status == LOST  # without contexts nothing is excused


def test_an_origin_that_accepts_a_request_over_its_context_fails() -> None:
    record = completed(0, EXPECTED, origin="node3")
    record.context_tokens = 1500
    verdict = judge(record, [], Rules(CONTEXTS))
    assert verdict.status == OVER_CONTEXT and "node3" in verdict.detail
    report = check([record], [], CLEAN_GAUGES, Rules(CONTEXTS))
    assert not report.ok and report.over_context == 1 and report.failures[0].status == OVER_CONTEXT


def test_a_thief_may_serve_only_what_fits_its_context() -> None:
    """``served_by`` is named when the server changes; the chunks after it carry that server."""
    record = completed(0, [101, 102], [103, 104], [105, 106], origin="node0")
    record.chunks[1].served_by = "node3"  # stolen by the short node from the second chunk on
    record.context_tokens = 1000
    assert record.thieves() == ["node3"] and record.chunk_servers() == ["node0", "node3", "node3"]
    assert judge(record, [], Rules(CONTEXTS)).status == EXACT
    report = check([record], [], CLEAN_GAUGES, Rules(CONTEXTS))
    assert report.stolen_by == {"node3": 1} and report.largest_stolen == {"node3": 1000}
    record.context_tokens = 1100
    verdict = judge(record, [], Rules(CONTEXTS))
    assert verdict.status == OVER_CONTEXT and verdict.detail == "stolen by node3 (context 1024): 1100 tokens"
    assert not check([record], [], CLEAN_GAUGES, Rules(CONTEXTS)).ok


# ---- the TTL: it bounds waiting, never streaming ----

TTL = 8.0


def timed_out(index: int, waited: float, *token_chunks: list[int]) -> RequestRecord:
    record = broken(index, ERROR_EVENT, *token_chunks, ended_at=0.5 + waited)
    record.error = f"request failed: request {TTL_ERROR}"
    return record


def test_timed_out_waiting_is_legal_only_after_the_client_waited_the_ttl() -> None:
    report = check([timed_out(0, 8.4)], [], CLEAN_GAUGES, Rules(ttl_s=TTL))
    assert report.ok and report.timed_out_waiting == 1 and report.lost == 0
    assert judge(timed_out(0, 8.4), [], Rules(ttl_s=TTL)).status == TIMED_OUT_WAITING
    early = judge(timed_out(0, 5.0), [], Rules(ttl_s=TTL))
    assert early.status == LOST and "under the TTL" in early.detail
    assert judge(timed_out(0, 8.4), []).status == LOST  # no TTL known: never excused


def test_a_request_that_had_started_must_not_time_out() -> None:
    """Tokens came, so it had started: its TTL no longer applies, however long it ran."""
    verdict = judge(timed_out(0, 12.0, [101, 102]), [], Rules(ttl_s=TTL))
    assert verdict.status == LOST
    assert not check([timed_out(0, 12.0, [101, 102])], [], CLEAN_GAUGES, Rules(ttl_s=TTL)).ok


def test_the_ttl_summary_counts_waits_and_streams_past_the_ttl() -> None:
    """Request 0 waited 1.5 s, was stolen by node1, which streamed until 9.5 s (past the TTL of 8 s
    after it was sent at 0.5 s), then resumed on its origin at 10.5 s (attempts 2). Request 1 got
    its first token only after the TTL (a client-side wait: legal, counted)."""
    stolen = completed(0, [101, 102], [103, 104], [105], [106])
    for chunk, t in zip(stolen.chunks, (2.0, 5.0, 9.5, 10.5)):
        chunk.t = t
    stolen.chunks[0].served_by = "node1"
    stolen.chunks[3].served_by, stolen.chunks[3].attempts = "node0", 2
    late = completed(1, EXPECTED)
    late.chunks[0].t = 9.0
    report = check([stolen, late], [], CLEAN_GAUGES, Rules(ttl_s=TTL))
    assert report.ok and report.completed_exactly == 2 and report.ttl_s == TTL
    assert (report.stolen_past_ttl, report.resumed_past_ttl, report.started_after_ttl) == (1, 1, 1)
    assert report.max_wait_s == 9.0 - 0.5
    stolen.chunks[2].t = 8.0  # the thief's last chunk before the TTL: not "past the TTL"
    assert check([stolen], [], CLEAN_GAUGES, Rules(ttl_s=TTL)).stolen_past_ttl == 0


# ---- engine stalls: a hung thief's leases lapse ----

LEASE = 1.0


def stolen_through_stall(attempts: int, end: float = 6.0, origin: str = "node0") -> RequestRecord:
    """Streamed by node1 from t=1.5; node1's engine hangs at t=2.0 (fault below); the rest of the
    stream comes at ``end``, its final chunk counting ``attempts``."""
    record = completed(0, [101, 102], [103, 104], [105, 106], origin=origin)
    for chunk, t in zip(record.chunks, (1.5, 1.9, end)):
        chunk.t = t
    record.chunks[0].served_by = "node1"
    record.chunks[2].served_by, record.chunks[2].attempts = ("node0" if attempts > 1 else "node1"), attempts
    return record


def stall(node: str = "node1", at: float = 2.0, observed: bool = True) -> FaultEvent:
    return FaultEvent(3, "engine_stall_thief", node, at, at + 3.0, "SIGUSR1", "mid_decode", observed)


def test_a_request_taken_back_from_a_stalled_thief_passes_and_is_counted() -> None:
    report = check([stolen_through_stall(attempts=2)], [stall()], CLEAN_GAUGES, Rules(lease_timeout_s=LEASE))
    assert report.ok and report.completed_exactly == 1 and report.taken_from_stalled == 1


def test_a_stalled_thief_that_kept_its_lease_fails() -> None:
    """Exact tokens, but the hung thief finished it on the first attempt after its stall: its
    heartbeats vouched for an engine that made no progress (the bug the stall rule is for)."""
    record = stolen_through_stall(attempts=1)
    verdict = judge(record, [stall()], Rules(lease_timeout_s=LEASE))
    assert verdict.status == HELD_THROUGH_STALL and "node1" in verdict.detail
    report = check([record], [stall()], CLEAN_GAUGES, Rules(lease_timeout_s=LEASE))
    assert not report.ok and report.held_through_stall == 1 and report.taken_from_stalled == 0
    assert judge(record, [stall()]).status == EXACT  # without a lease timeout the rule is off


def test_the_stall_rule_applies_only_where_a_lapse_was_due() -> None:
    record = stolen_through_stall(attempts=1, end=4.2)  # ended before 2 lease timeouts (+ slack) had passed
    assert judge(record, [stall()], Rules(lease_timeout_s=LEASE)).status == EXACT
    late = stolen_through_stall(attempts=1)
    assert judge(late, [stall(observed=False)], Rules(lease_timeout_s=LEASE)).status == EXACT  # never hung
    assert judge(late, [stall(at=1.0)], Rules(lease_timeout_s=LEASE)).status == EXACT  # not streaming from it yet
    assert judge(late, [stall(node="node2")], Rules(lease_timeout_s=LEASE)).status == EXACT  # another thief
    frozen_origin = FaultEvent(4, "sigstop_origin", "node0", 2.5, 5.0, "SIGSTOP", "mid_decode")
    assert judge(late, [stall(), frozen_origin], Rules(lease_timeout_s=LEASE)).status == EXACT  # it could not
    own = stolen_through_stall(attempts=1, origin="node1")  # the stalled node's own request just waits
    own.chunks[0].served_by = own.chunks[2].served_by = "node1"
    assert judge(own, [stall()], Rules(lease_timeout_s=LEASE)).status == EXACT

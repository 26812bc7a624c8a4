"""The chaos checker on synthetic records: it must pass clean runs and name every kind of failure."""

from __future__ import annotations

from bench.chaos_checker import (
    COMPLETED,
    DROPPED,
    DUPLICATED,
    ERROR_EVENT,
    EXACT,
    HUNG,
    LEAK_GAUGES,
    LOST,
    MISSING,
    NOT_ACCEPTED,
    ORIGIN_DIED,
    REJECTED,
    UNACCEPTED,
    WRONG,
    Chunk,
    FaultEvent,
    Leak,
    RequestRecord,
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

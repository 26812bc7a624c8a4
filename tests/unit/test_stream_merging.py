"""A node that falls behind catches up in bigger pieces, never by losing or reordering tokens:
steps merged per request on the engine link (``engine_client.merge_outputs``) and client events
merged per SSE chunk (``http_api._next_events``). Pure logic: no sockets, no processes."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from p2psched.core.engine import EngineOutput, EngineStats, Step
from p2psched.core.scheduler import ClientEvent
from p2psched.engine_client import merge_outputs
from p2psched.http_api import _next_events


def step(*outputs: EngineOutput) -> Step:
    return Step(list(outputs), 0.01, EngineStats(), 1)


def test_steps_merge_per_request_in_order_keeping_the_finish():
    merged = merge_outputs([
        step(EngineOutput("a", [1]), EngineOutput("b", [10])),
        step(EngineOutput("a", [2]), EngineOutput("b", [11], "stop")),
        step(EngineOutput("a", [3, 4], "length"), EngineOutput("c", [20])),
    ])
    assert merged == [EngineOutput("a", [1, 2, 3, 4], "length"), EngineOutput("b", [10, 11], "stop"),
                      EngineOutput("c", [20])]


def test_merging_leaves_the_steps_it_read_unchanged():
    first = step(EngineOutput("a", [1]))
    merge_outputs([first, step(EngineOutput("a", [2]))])
    assert first.outputs == [EngineOutput("a", [1])]


def events_of(*events: ClientEvent) -> SimpleNamespace:
    queue: asyncio.Queue[ClientEvent] = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)
    return SimpleNamespace(handle=SimpleNamespace(events=queue), held=None)


def drain(job: SimpleNamespace, count: int) -> list[ClientEvent]:
    async def read() -> list[ClientEvent]:
        return [await _next_events(job) for _ in range(count)]  # type: ignore[arg-type]

    return asyncio.run(read())


def test_queued_token_events_become_one_chunk_up_to_the_finish():
    job = events_of(ClientEvent("r", [1]), ClientEvent("r", [2, 3]), ClientEvent("r", [4], "stop"),
                    ClientEvent("r", [9]))
    first, second = drain(job, 2)
    assert (first.token_ids, first.finish_reason) == ([1, 2, 3, 4], "stop")
    assert second.token_ids == [9]


def test_a_failure_is_never_merged_into_the_tokens_before_it():
    for failure in (ClientEvent("r", [], error="engine failure: gone"), ClientEvent("r", [7], "error")):
        job = events_of(ClientEvent("r", [1]), ClientEvent("r", [2]), failure)
        tokens, last = drain(job, 2)
        assert (tokens.token_ids, tokens.finish_reason, tokens.error) == ([1, 2], None, None)
        assert last == failure


def test_a_change_of_server_or_attempt_starts_a_new_chunk():
    job = events_of(ClientEvent("r", [1], served_by="a"), ClientEvent("r", [2], served_by="b"),
                    ClientEvent("r", [3], served_by="b", attempts=2), ClientEvent("r", [4], "stop", served_by="b",
                                                                                  attempts=2))
    chunks = drain(job, 3)
    assert [(c.token_ids, c.served_by, c.attempts) for c in chunks] == [([1], "a", 1), ([2], "b", 1),
                                                                        ([3, 4], "b", 2)]
    assert chunks[-1].finish_reason == "stop"

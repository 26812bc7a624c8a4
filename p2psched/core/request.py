"""An accepted request as its origin sees it, and the state machine it moves through.

    PENDING --admit--> RUNNING --finish--> FINISHED
    PENDING --grant--> LEASED  --finish--> FINISHED
    LEASED  --lease expired--> PENDING (pinned: the origin finishes it itself)
    LEASED  --handed back--> PENDING (the thief cannot run it; never granted to that thief again)
    any live state --> FAILED (deadline, engine failure) | CANCELLED (client gone)

Transitions are data (``TRANSITIONS``); anything else raises ``IllegalTransition``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .errors import IllegalTransition
from .protocol import Sampling


class State(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    LEASED = "leased"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


_ENDS = {State.FINISHED, State.FAILED, State.CANCELLED}
TRANSITIONS: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.RUNNING, State.LEASED, State.FAILED, State.CANCELLED}),
    State.RUNNING: frozenset({State.FINISHED, State.FAILED, State.CANCELLED}),
    State.LEASED: frozenset({State.PENDING, State.FINISHED, State.FAILED, State.CANCELLED}),
    State.FINISHED: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELLED: frozenset(),
}


def kv_reservation(num_prompt_tokens: int, max_tokens: int, reserve_output_tokens: int | None = None) -> int:
    """KV tokens that admission holds for a request until it ends: the prompt and all of
    ``max_tokens``, or only ``reserve_output_tokens`` of output on an engine that preempts by
    recompute when blocks run out (it overcommits its own requests to keep batches full).

    A steal is counted in the full form on both sides. The thief offers its free KV tokens
    (``Scheduler.plan_steal``; a thief with a queue of its own offers its whole cache, as the
    tasks wait in its queue); the victim fits each task it grants at prompt + max_tokens against
    that offer (``policy.select_grant``, through ``Request.reserved_tokens``); the thief books
    each stolen task at that amount when it starts it (``Scheduler._reservation``). A steal does
    not say how its thief's engine overcommits, so the full form is the one a victim can compute;
    with it a grant to an idle thief never exceeds its offer and every task starts at once."""
    outputs = max_tokens if reserve_output_tokens is None else min(reserve_output_tokens, max_tokens)
    return num_prompt_tokens + outputs


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: Sampling
    arrival: float
    deadline: float  # by which it must have started running somewhere (--scheduler-ttl after arrival)
    state: State = State.PENDING
    delivered_token_ids: list[int] = field(default_factory=list)
    epoch: int = 0  # bumped each time a lease is fenced
    attempts: int = 1
    is_pinned: bool = False  # never granted to a thief (resumed, or itself stolen)
    served_by: str = ""  # node name that produced the latest tokens
    origin_id: str = ""  # for stolen-in requests: the node to stream tokens to
    has_started: bool = False  # some engine admitted it: the deadline no longer applies
    refused_by: set[str] = field(default_factory=set)  # thieves that handed it back as "cannot run"

    @property
    def is_done(self) -> bool:
        return self.state in _ENDS

    @property
    def remaining_tokens(self) -> int:
        return max(0, self.sampling.max_tokens - len(self.delivered_token_ids))

    @property
    def work_tokens(self) -> int:
        """Tokens of work left: what load and grant sizing count."""
        return len(self.prompt_token_ids) + len(self.delivered_token_ids) + self.remaining_tokens

    @property
    def reserved_tokens(self) -> int:
        """What a steal counts this request at, on both sides (``kv_reservation``'s full form)."""
        return kv_reservation(len(self.prompt_token_ids), self.sampling.max_tokens)

    def transition(self, new: State) -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"request {self.request_id}: {self.state.value} -> {new.value}")
        self.state = new

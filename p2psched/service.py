"""What the HTTP surface and the metrics see of a node: a small interface and a snapshot.

``http_api.py`` and ``metrics.py`` import this module, never ``node.py``; the node implements
``NodeService`` and builds the HTTP server around itself. Metrics are read from one
``NodeSnapshot`` per scrape, so a scrape sees one consistent moment and reaches into nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from .containment import Containment
from .core.engine import ChatTemplateFn, EngineLimits, EngineStats, TextStreamFactory, Tokenizer
from .core.protocol import Sampling
from .core.request import Request
from .core.scheduler import ClientEvent
from .core.stats import Stats


@dataclass
class Handle:
    """An accepted request: its events (tokens, the end, an error) arrive on ``events``."""

    request: Request
    events: asyncio.Queue[ClientEvent]

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass(frozen=True)
class ModelInfo:
    name: str  # what clients send as "model" and /v1/models lists
    model_id: str  # what decides the tokens (weights, dtype): accepted as a model name too
    limits: EngineLimits
    max_tokens_cap: int
    created: int  # unix time the node started


@dataclass(frozen=True)
class NodeSnapshot:
    node_id: str
    name: str
    model_id: str
    draining: bool
    registry_stale: bool
    engine_stalled: bool
    public_key: str
    steal_endpoint: str
    result_endpoint: str
    peers: list[str]
    load: dict[str, int]
    stats: Stats  # a copy
    engine: EngineStats
    engine_pid: int | None
    in_flight: int  # client requests accepted and not yet answered
    queued_send_bytes: int
    leases_held: int
    stolen_in_active: int
    scheduler_requests: int
    max_kv_tokens: int

    def as_json(self) -> dict[str, Any]:
        """The /stats body."""
        return {"node_id": self.node_id, "name": self.name, "model_id": self.model_id, "draining": self.draining,
                "registry_stale": self.registry_stale, "engine_stalled": self.engine_stalled,
                "public_key": self.public_key, "steal_endpoint": self.steal_endpoint,
                "result_endpoint": self.result_endpoint, "peers": self.peers, "load": self.load,
                "stats": self.stats.as_dict(), "engine": msgspec.structs.asdict(self.engine),
                "engine_pid": self.engine_pid}


class NodeService(Protocol):
    name: str
    tokenizer: Tokenizer
    text_stream: TextStreamFactory
    chat_template: ChatTemplateFn
    containment: Containment
    ready: asyncio.Event  # set once the node serves (registered, when it joins a cluster)
    is_draining: bool

    @property
    def model(self) -> ModelInfo: ...

    @property
    def max_concurrent_requests(self) -> int: ...

    @property
    def is_engine_stalled(self) -> bool: ...

    def submit(self, prompt_token_ids: list[int], sampling: Sampling) -> Handle:
        """Accept a request (raises ``RequestRejected``); its events arrive on the handle."""
        ...

    def cancel(self, request_id: str) -> None:
        """The client went away: stop the request wherever it runs."""
        ...

    def done(self, request_id: str) -> None:
        """The client got its answer."""
        ...

    def note_rejected(self) -> None:
        """A request refused at the HTTP edge (counted)."""
        ...

    def snapshot(self) -> NodeSnapshot: ...

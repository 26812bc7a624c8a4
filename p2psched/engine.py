"""The engine interface the scheduler drives, and the thread that runs it.

Any engine (the simulated one here, the real one in ``server/``) implements ``Engine``: plain,
synchronous, single-owner. ``EngineRunner`` owns the engine in one dedicated thread: the event
loop hands it requests and aborts through a thread-safe inbox, and receives each step's
outputs through ``loop.call_soon_threadsafe``. The loop never waits on a step; the step never
waits on the network.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import ConfigError
from .protocol import MAX_CONTEXT_TOKENS, FinishReason, Sampling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    max_num_seqs: int
    max_kv_tokens: int  # prompt + output tokens the KV cache holds across all sequences
    max_model_len: int
    vocab_size: int
    # Admission reserves prompt + min(max_tokens, this) KV tokens per request; None reserves all
    # of max_tokens (an engine that preempts on overflow can afford to overcommit).
    reserve_output_tokens: int | None = None
    supports_stop_strings: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_model_len <= MAX_CONTEXT_TOKENS:
            raise ConfigError(f"max model len must be in 1..{MAX_CONTEXT_TOKENS} (the protocol's limit), "
                              f"got {self.max_model_len}")

    def refusal(self, prompt_token_ids: list[int], sampling: Sampling,
                delivered_token_ids: list[int] | None = None) -> Refusal | None:
        """Why this engine cannot run the request, or None. The origin's HTTP layer answers 400
        with it; a thief hands the task back to its origin with it (a task also carries the
        tokens already delivered, which it must be able to read back)."""
        if delivered_token_ids:
            if len(delivered_token_ids) > sampling.max_tokens or max(delivered_token_ids) >= self.vocab_size:
                return Refusal("delivered tokens past max_tokens or the vocabulary", "prompt")
        context = len(prompt_token_ids) + sampling.max_tokens
        if context > self.max_model_len:
            return Refusal(f"prompt ({len(prompt_token_ids)} tokens) plus max_tokens ({sampling.max_tokens}) "
                           f"exceed the context length {self.max_model_len}", "prompt", "context_length_exceeded")
        if context > self.max_kv_tokens:
            return Refusal(f"prompt plus max_tokens ({context}) exceed this server's KV capacity "
                           f"({self.max_kv_tokens} tokens)", "max_tokens", "context_length_exceeded")
        if prompt_token_ids and max(prompt_token_ids) >= self.vocab_size:
            return Refusal(f"prompt token ids must be below the vocabulary size {self.vocab_size}", "prompt")
        if sampling.stop and not self.supports_stop_strings:
            return Refusal("stop strings are not supported by this engine; use stop_token_ids", "stop")
        return None


@dataclass(frozen=True)
class Refusal:
    message: str
    param: str
    code: str = "invalid_request_error"


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: Sampling
    # Tokens already delivered to the client by an earlier attempt; generation resumes after them.
    output_token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class EngineOutput:
    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class TextStream(Protocol):
    """Token ids in, visible text out; stops at a stop string (see server/detokenizer.py)."""

    is_stopped: bool

    def push(self, token_ids: list[int]) -> str: ...

    def flush(self) -> str: ...


TextStreamFactory = Callable[[list[str]], TextStream]
ChatTemplateFn = Callable[[list[dict[str, Any]]], str]  # chat messages -> prompt text


class Engine(Protocol):
    model_id: str

    @property
    def limits(self) -> EngineLimits: ...

    def add(self, request: EngineRequest) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def has_work(self) -> bool: ...

    def step(self) -> list[EngineOutput]: ...


StepCallback = Callable[[list[EngineOutput], float], None]


class EngineRunner:
    """Runs ``engine.step()`` in a dedicated thread; ``on_outputs(outputs, busy_s)`` on the loop."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, on_outputs: StepCallback,
                 min_step_s: float = 0.0):
        self._engine = engine
        self._min_step_s = min_step_s
        self._loop = loop
        self._on_outputs = on_outputs
        self._inbox: queue.SimpleQueue[tuple[str, EngineRequest | str | None]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._failure: BaseException | None = None
        self._step_started_at: float | None = None  # monotonic, while a step runs (written by the engine thread)
        self.stopped = asyncio.Event()

    def start(self) -> None:
        self._thread.start()

    def add(self, request: EngineRequest) -> None:
        self._inbox.put(("add", request))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def stop(self) -> None:
        self._inbox.put(("stop", None))

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    def busy_for(self) -> float:
        """Seconds the current step has been running; 0 between steps. A step far longer than
        any normal one means the engine is stuck: its heartbeats must stop vouching for it."""
        started = self._step_started_at
        return 0.0 if started is None else time.monotonic() - started

    def _drain(self, block: bool) -> bool:
        """Apply inbox commands; return False once asked to stop."""
        while True:
            try:
                kind, payload = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return True
            block = False
            if kind == "add":
                assert isinstance(payload, EngineRequest)
                self._engine.add(payload)
            elif kind == "abort":
                assert isinstance(payload, str)
                self._engine.abort(payload)
            else:
                return False

    def _run(self) -> None:
        try:
            while self._drain(block=not self._engine.has_work()):
                if not self._engine.has_work():
                    continue
                self._step_started_at = time.monotonic()
                started = time.perf_counter()
                outputs = self._engine.step()
                busy_s = time.perf_counter() - started
                self._step_started_at = None
                if busy_s < self._min_step_s:
                    time.sleep(self._min_step_s - busy_s)
                    busy_s = self._min_step_s
                self._loop.call_soon_threadsafe(self._on_outputs, outputs, busy_s)
        except BaseException as exc:  # surfaced to the node, which fails its requests and exits
            log.exception("engine thread crashed")
            self._failure = exc
        finally:
            try:
                self._loop.call_soon_threadsafe(self.stopped.set)
            except RuntimeError:  # the node's loop closed first (it waits for us, but only so long)
                pass

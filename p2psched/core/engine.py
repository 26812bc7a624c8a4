"""The engine interface: what an engine is asked to do and what it answers.

Any engine (the simulated one, the real one in ``server/``) implements ``Engine``: plain,
synchronous, single-owner. It runs in its own process (``engine_core.py``), driven by a busy
loop; the node talks to it through ``engine_client.py`` with the messages defined here, which
are msgspec structs so they cross the process boundary as msgpack arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from .errors import ConfigError
from .protocol import MAX_CONTEXT_TOKENS, FinishReason, Sampling


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


class EngineRequest(msgspec.Struct, frozen=True, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: Sampling
    # Tokens already delivered to the client by an earlier attempt; generation resumes after them.
    output_token_ids: list[int] = []


class EngineOutput(msgspec.Struct, frozen=True, array_like=True):
    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None


class EngineStats(msgspec.Struct, frozen=True, array_like=True):
    """What an engine reports about itself with every step (the node never reads engine state)."""

    running: int = 0  # sequences in the engine, waiting or computing
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    prefix_cache_hit_blocks: int = 0
    prefix_cache_queried_blocks: int = 0
    preemptions: int = 0


class StepResult(msgspec.Struct, frozen=True, array_like=True):
    outputs: list[EngineOutput]
    stats: EngineStats


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

    def step(self) -> StepResult: ...

    def stats(self) -> EngineStats: ...


# ---- messages between the node and its engine process (engine_client.py <-> engine_core.py) ----


class Commands(msgspec.Struct, array_like=True):
    """Node -> engine: everything since the last message, in order: a request to add, or the id
    of one to abort (an id can be aborted and added again in one message)."""

    ops: list[EngineRequest | str] = []
    stall_s: float = 0.0  # fault injection (sim engine): the next step hangs this long
    stop: bool = False


class Step(msgspec.Struct, array_like=True):
    """Engine -> node: one step's outputs, its wall time, and the engine's stats after it."""

    outputs: list[EngineOutput]
    busy_s: float
    stats: EngineStats
    commands_seen: int  # Commands messages applied so far: the node knows what this step had seen


@dataclass(frozen=True)
class Ready:
    model_id: str
    limits: EngineLimits
    tokenizer: tuple[str, str]  # ("bytes" | "sim" | "hf", model dir): how the node builds the same tokenizer
    model_dir: str  # for the chat template; "" for presets and the sim engine
    stats: EngineStats


@dataclass(frozen=True)
class StartFailed:
    message: str
    is_config_error: bool  # a bad flag or model directory (exit 2), not a crash

"""A simulated engine: a cost model instead of a model, tokens from a hash.

Token ``i`` of a request's output is ``sim_token(seed, prompt, i)``: a deterministic function of
the seed, the prompt and the position, independent of batch composition, of the node that runs
it and of whether it was resumed. Any run can therefore be checked token by token. It never
emits end-of-sequence: a request runs exactly ``max_tokens`` tokens (or stops at a stop id).

Step time follows a simple cost model (sleeping in the engine process): time per prefill token,
plus a decode step that grows with batch size and total context.
"""

from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import dataclass, field

from .core.config import SimEngineConfig
from .core.engine import EngineLimits, EngineOutput, EngineRequest, EngineStats, StepResult
from .core.protocol import FinishReason


def prompt_digest(prompt_token_ids: list[int]) -> bytes:
    return hashlib.blake2b(struct.pack(f"<{len(prompt_token_ids)}I", *prompt_token_ids), digest_size=16).digest()


def sim_token(seed: int, digest: bytes, index: int, vocab_size: int) -> int:
    h = hashlib.blake2b(digest + struct.pack("<QQ", seed, index), digest_size=8).digest()
    return int.from_bytes(h, "little") % vocab_size


def expected_tokens(seed: int, prompt_token_ids: list[int], max_tokens: int, vocab_size: int) -> list[int]:
    """The exact output the sim engine produces for a request (used by tests and benches)."""
    digest = prompt_digest(prompt_token_ids)
    return [sim_token(seed, digest, i, vocab_size) for i in range(max_tokens)]


@dataclass
class _Seq:
    request: EngineRequest
    digest: bytes
    output: list[int] = field(default_factory=list)
    is_prefilled: bool = False


class SimEngine:
    def __init__(self, config: SimEngineConfig, max_num_seqs: int):
        self._config = config
        self._limits = EngineLimits(max_num_seqs, config.kv_tokens, config.max_model_len, config.vocab_size)
        self._seqs: dict[str, _Seq] = {}
        # Tokens depend on the vocabulary only: nodes with other step costs or context lengths
        # (heterogeneous clusters) steal from each other; a Steal carries the thief's max model len.
        self.model_id = "sim-" + hashlib.blake2b(f"vocab={config.vocab_size}".encode(), digest_size=6).hexdigest()

    @property
    def limits(self) -> EngineLimits:
        return self._limits

    def add(self, request: EngineRequest) -> None:
        self._seqs[request.request_id] = _Seq(request, prompt_digest(request.prompt_token_ids),
                                               list(request.output_token_ids))

    def abort(self, request_id: str) -> None:
        self._seqs.pop(request_id, None)

    def has_work(self) -> bool:
        return bool(self._seqs)

    def step_cost_s(self) -> float:
        c = self._config
        prefill_tokens = sum(len(s.request.prompt_token_ids) + len(s.output)
                             for s in self._seqs.values() if not s.is_prefilled)
        context = sum(len(s.request.prompt_token_ids) + len(s.output) for s in self._seqs.values())
        ms = (c.decode_step_ms + c.decode_ms_per_seq * len(self._seqs)
              + c.decode_ms_per_kilotoken * context / 1000 + c.prefill_ms_per_token * prefill_tokens)
        return ms / 1000

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._seqs))

    def step(self) -> StepResult:
        cost_s = self.step_cost_s()
        if cost_s > 0:
            time.sleep(cost_s)
        return self.advance()

    def advance(self) -> StepResult:
        """One step's outputs without its cost (a simulator on a virtual clock charges
        ``step_cost_s()`` itself)."""
        outputs = []
        for seq in list(self._seqs.values()):
            seq.is_prefilled = True
            sampling = seq.request.sampling
            token = sim_token(sampling.seed, seq.digest, len(seq.output), self._config.vocab_size)
            seq.output.append(token)
            finish: FinishReason | None = None
            if token in sampling.stop_token_ids:
                finish = "stop"
            elif len(seq.output) >= sampling.max_tokens or len(seq.request.prompt_token_ids) + len(seq.output) >= self._config.max_model_len:
                finish = "length"
            outputs.append(EngineOutput(seq.request.request_id, [token], finish))
            if finish is not None:
                del self._seqs[seq.request.request_id]
        return StepResult(outputs, self.stats())


class SimTokenizer:
    """Byte-level in (UTF-8 bytes are token ids); out, each id shows as one letter a-z."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int]) -> str:
        return "".join(chr(97 + t % 26) for t in token_ids)

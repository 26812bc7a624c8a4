"""Adapter from the real engine (``server.engine.LLMEngine``) to the scheduler's ``Engine``.

Imported only by the composition root (``p2psched/server.py``): it is the one place where the
scheduler's types meet torch's world, so the scheduler core stays torch-free.
"""

from __future__ import annotations

from server.engine import LLMEngine
from server.engine_config import EngineConfig
from server.loader import LoadedModel
from server.sampling import SamplingParams

from .core.engine import EngineLimits, EngineOutput, EngineRequest, EngineStats, StepResult
from .core.protocol import FinishReason

_REASONS: dict[str | None, FinishReason | None] = {None: None, "stop": "stop", "length": "length"}


class RealEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, backend: object | None = None):
        self._engine = LLMEngine(loaded.model, loaded.config, loaded.tokenizer, config, backend,  # type: ignore[arg-type]
                                 loaded.model_id)
        self.model_id = self._engine.model_id  # the engine's: it covers an e4m3 cache's scales
        self._limits = EngineLimits(config.max_num_seqs, self._engine.kv_capacity_tokens, self._engine.max_model_len,
                                    loaded.config.vocab_size, reserve_output_tokens=config.block_size,
                                    supports_stop_strings=True)
        self._rejected: list[EngineOutput] = []

    @property
    def limits(self) -> EngineLimits:
        return self._limits

    def add(self, request: EngineRequest) -> None:
        s = request.sampling
        params = SamplingParams(max_tokens=s.max_tokens, seed=s.seed, temperature=s.temperature, top_p=s.top_p,
                                top_k=s.top_k, stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
                                ignore_eos=s.ignore_eos)
        try:
            self._engine.add(request.request_id, request.prompt_token_ids, params, request.output_token_ids)
        except ValueError:  # validated at the HTTP edge already; a peer's task may still not fit
            self._rejected.append(EngineOutput(request.request_id, [], "error"))

    def stats(self) -> EngineStats:
        blocks = self._engine.blocks
        return EngineStats(len(self._engine.seqs), blocks.num_blocks, blocks.num_free, blocks.prefix_hits,
                           blocks.prefix_queries, self._engine.batcher.num_preemptions)

    def abort(self, request_id: str) -> None:
        self._engine.abort(request_id)

    def has_work(self) -> bool:
        return bool(self._rejected) or self._engine.has_work()

    def step(self) -> StepResult:
        outputs, self._rejected = self._rejected, []
        for out in self._engine.step():
            outputs.append(EngineOutput(out.request_id, out.token_ids, _REASONS.get(out.finish_reason, "error")))
        return StepResult(outputs, self.stats())

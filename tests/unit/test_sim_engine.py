from p2psched.core.config import SimEngineConfig
from p2psched.core.engine import EngineRequest
from p2psched.core.protocol import Sampling
from p2psched.sim_engine import SimEngine, expected_tokens

CFG = SimEngineConfig(decode_step_ms=0, decode_ms_per_seq=0, prefill_ms_per_token=0, decode_ms_per_kilotoken=0)


def run(engine, requests):
    out = {r.request_id: list(r.output_token_ids) for r in requests}
    for r in requests:
        engine.add(r)
    while engine.has_work():
        for o in engine.step().outputs:
            out[o.request_id] += o.new_token_ids
    return out


def test_tokens_do_not_depend_on_batch_and_resume_continues_exactly():
    sampling = Sampling(max_tokens=12, seed=5)
    alone = run(SimEngine(CFG, 8), [EngineRequest("a", [1, 2, 3], sampling)])["a"]
    batch = [EngineRequest("a", [1, 2, 3], sampling)] + [
        EngineRequest(f"x{i}", [i], Sampling(max_tokens=3 + i, seed=i)) for i in range(5)]
    assert run(SimEngine(CFG, 8), batch)["a"] == alone
    resumed = run(SimEngine(CFG, 8), [EngineRequest("a", [1, 2, 3], sampling, alone[:7])])["a"]
    assert resumed == alone == expected_tokens(5, [1, 2, 3], 12, CFG.vocab_size)


def test_stop_token_ids_end_a_request_early():
    full = expected_tokens(1, [9], 20, CFG.vocab_size)
    sampling = Sampling(max_tokens=20, seed=1, stop_token_ids=[full[4]])
    out = run(SimEngine(CFG, 1), [EngineRequest("a", [9], sampling)])["a"]
    assert out == full[: full.index(full[4]) + 1]

"""FastDeploy's load-balancing launch line, verbatim but for the ports and the model path, starts a
node of the seed's model family that registers and serves: ERNIE 4.5 with random weights and,
as its PaddlePaddle release ships, a sentencepiece tokenizer.model and no tokenizer.json."""

from __future__ import annotations

import shlex

import torch
import transformers

from p2psched.cluster import NodeProcess, http_json
from p2psched.redis_server import EmbeddedRedis, free_port
from server.tokenizer import SentencePieceTokenizer, load_tokenizer
from tests.unit.test_config import SEED_LAUNCH_LINE
from tests.unit.test_sentencepiece_tokenizer import MODELS, ernie_config, train

from .helpers import wait_for


def test_the_seed_launch_line_starts_a_node_that_registers_and_serves(tmp_path):
    model_dir = train(tmp_path, **MODELS["plain"])  # tokenizer.model, tokenizer_config.json with a chat template
    ernie_config(model_dir, legacy_layout=False)
    tokenizer = load_tokenizer(model_dir)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    torch.manual_seed(0)
    transformers.Ernie4_5ForCausalLM(transformers.Ernie4_5Config(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=True)).save_pretrained(model_dir, safe_serialization=True)
    with EmbeddedRedis() as redis:
        http, metrics, queue = free_port(), free_port(), free_port()
        substitutes = {"8801": str(http), "8802": str(metrics), "8803": str(queue), "6379": str(redis.port),
                       "baidu/ERNIE-4.5-0.3B-Paddle": str(model_dir)}
        args = [substitutes.get(word, word) for word in shlex.split(SEED_LAUNCH_LINE)]
        assert len(args) == len(shlex.split(SEED_LAUNCH_LINE)) and sum(a != b for a, b in zip(
            args, shlex.split(SEED_LAUNCH_LINE))) == len(substitutes)  # each substitute replaced exactly once
        (tmp_path / "cluster0").mkdir()
        node = NodeProcess("seed", http, args, tmp_path / "cluster0" / "seed.log")
        node.start()
        try:
            node.wait_healthy(120)
            keys = [key.decode() for key in redis.admin_client().scan_iter("p2psched:{default.0}:node:*")]
            assert len(keys) == 1, keys
            record = redis.admin_client().hgetall(keys[0])
            assert record[b"http_url"] == f"http://127.0.0.1:{http}".encode()  # Redis on loopback: so is the node
            status, models = http_json(node.url + "/v1/models")
            assert status == 200 and len(models["data"]) == 1, models
            status, body = http_json(node.url + "/v1/completions", {"model": models["data"][0]["id"],
                                                                    "prompt": "the cat sat", "max_tokens": 6})
            assert status == 200, body
            assert body["usage"]["completion_tokens"] == 6
            assert body["usage"]["prompt_tokens"] == len(tokenizer.encode("the cat sat"))
            status, body = http_json(node.url + "/v1/chat/completions", {
                "model": models["data"][0]["id"], "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 4, "ignore_eos": True})
            assert status == 200, body
            prompt = tokenizer.encode("<|begin_of_sentence|>User: hello\nAssistant: ")
            assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 4,
                                     "total_tokens": len(prompt) + 4}
            text = wait_for(lambda: _get(f"http://127.0.0.1:{metrics}/metrics"), timeout=10)
            assert "p2psched_" in text
            assert f"--engine-worker-queue-port {queue} is FastDeploy's" in node.log_text()
            assert "not applicable" in node.log_text()
        finally:
            node.terminate(60)
    assert node.proc is not None and node.proc.returncode == 0


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()

"""Real node processes serving the real `tiny` model."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from p2psched.cluster import Cluster, http_json

REAL = ["--engine", "real", "--model", "tiny", "--cpu-threads", "1", "--max-num-seqs", "2",
        "--heartbeat-interval", "0.3", "--lease-timeout", "2.0", "--scheduler-min-load-score", "2"]


def body(i: int) -> dict:
    seeded = i % 2 == 1
    return {"model": "tiny", "prompt": f"question {i}: " + "why? " * (i % 5), "max_tokens": 24 + i % 17,
            "ignore_eos": True, "return_token_ids": True, "temperature": 0.8 if seeded else 0.0,
            "top_p": 0.95, "seed": 100 + i if seeded else None}


def send_all(url: str, n: int) -> dict[int, dict]:
    def one(i: int) -> dict:
        status, payload = http_json(url + "/v1/completions", {k: v for k, v in body(i).items() if v is not None})
        assert status == 200, payload
        return payload

    with ThreadPoolExecutor(n) as pool:
        return dict(zip(range(n), pool.map(one, range(n))))


def test_stolen_requests_give_the_same_text_as_unstolen_ones(cluster_factory, tmp_path):
    n = 30
    alone = Cluster(1, REAL, scheduler_name="local", log_dir=str(tmp_path / "alone"))
    with alone:
        reference = send_all(alone.nodes[0].url, n)
    cluster = cluster_factory(3, REAL)
    shared = send_all(cluster.nodes[0].url, n)
    stolen = [i for i, r in shared.items() if r["p2psched"]["served_by"] != "node0"]
    assert stolen, "no request was stolen"
    assert any(i % 2 for i in stolen) and any(i % 2 == 0 for i in stolen), "want greedy and seeded steals"
    for i in range(n):
        ours, ref = shared[i]["choices"][0], reference[i]["choices"][0]
        assert ours["token_ids"] == ref["token_ids"], f"request {i}"
        assert ours["text"] == ref["text"]
        assert len(ours["token_ids"]) == body(i)["max_tokens"]


@pytest.fixture(scope="module")
def real_node(tmp_path_factory):
    cluster = Cluster(1, REAL + ["--max-model-len", "128"], scheduler_name="local",
                      log_dir=str(tmp_path_factory.mktemp("real")))
    try:
        yield cluster.start().nodes[0]
    finally:
        cluster.stop()


@pytest.mark.parametrize("payload, param", [
    ({"prompt": "x" * 200, "max_tokens": 4}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": [300]}, "prompt"),
])
def test_bad_requests_get_400_and_the_node_keeps_serving(real_node, payload, param):
    status, error = http_json(real_node.url + "/v1/completions", payload)
    assert status == 400 and error["error"]["param"] == param, error
    status, ok = http_json(real_node.url + "/v1/completions", {"prompt": "still there?", "max_tokens": 5,
                                                                "ignore_eos": True})
    assert status == 200 and ok["usage"]["completion_tokens"] == 5


def test_stop_strings_cut_the_text(real_node):
    _, full = http_json(real_node.url + "/v1/completions", {"prompt": "stop test", "max_tokens": 40, "temperature": 0,
                                                             "ignore_eos": True, "return_token_ids": True})
    text = full["choices"][0]["text"]
    candidates = [text[i:i + 2] for i in range(3, len(text) - 2)
                  if text[i:i + 2].isascii() and text[i:i + 2].isprintable() and text[i:i + 2] not in text[:i + 1]]
    assert candidates, text
    stop = candidates[0]
    _, cut = http_json(real_node.url + "/v1/completions", {"prompt": "stop test", "max_tokens": 40, "temperature": 0,
                                                            "ignore_eos": True, "stop": [stop]})
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == text[:text.index(stop)]


def test_unknown_model_directory_is_a_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "p2psched.server", "--model", "/no/such/model"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("is neither a preset (tiny, small, llama-1b) nor a directory")

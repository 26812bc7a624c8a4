"""Input at the edge of what is legal, garbage in the registry, Redis away, mixed engines: the
nodes keep serving, and every request a node accepts completes exactly (real processes)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis as redis_lib

from p2psched import PROTOCOL_VERSION
from p2psched.cluster import http_json
from p2psched.core.protocol import (
    MAX_CONTEXT_TOKENS,
    MAX_SEED,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKEN_ID,
    MAX_TOP_K,
)
from p2psched.sim_engine import expected_tokens

from .helpers import VOCAB, complete, expected_for, wait_for

MAX_LEN = 4096  # --sim-max-model-len of these clusters (the default)
BASE = {"model": "sim", "prompt": [5, 6, 7], "max_tokens": 8, "seed": 1, "return_token_ids": True}

# (name, fields over BASE, expected status). Legal ones sit on a limit of the protocol's table
# or of the engine; the others are one step past it.
EXTREMES: list[tuple[str, dict[str, Any], int]] = [
    ("top_k at the protocol's cap", {"top_k": MAX_TOP_K}, 200),
    ("top_k 2^40", {"top_k": 1 << 40}, 400),
    ("top_k 2^64", {"top_k": 1 << 64}, 400),
    ("stop_token_ids, as many as allowed, largest id", {"stop_token_ids": [MAX_TOKEN_ID - i for i in
                                                                          range(MAX_STOP_TOKEN_IDS)]}, 200),
    ("stop_token_ids, one too many", {"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, 400),
    ("stop_token_id 2^31", {"stop_token_ids": [MAX_TOKEN_ID + 1]}, 400),
    ("thousands of stop_token_ids", {"stop_token_ids": list(range(5000))}, 400),
    ("largest seed", {"seed": MAX_SEED}, 200),
    ("seed 2^63", {"seed": MAX_SEED + 1}, 400),
    ("seed 2^64", {"seed": 1 << 64}, 400),
    ("temperature 100", {"temperature": 100.0}, 200),
    ("temperature 1e308", {"temperature": 1e308}, 400),
    ("smallest top_p", {"top_p": 5e-324}, 200),
    ("max_tokens filling the context", {"max_tokens": MAX_LEN - 3, "stream": False}, 200),
    ("max_tokens one past the context", {"max_tokens": MAX_LEN - 2}, 400),
    ("max_tokens past the protocol's context", {"max_tokens": MAX_CONTEXT_TOKENS + 1}, 400),
    ("prompt of the largest token ids", {"prompt": [VOCAB - 1] * 64}, 200),
    ("prompt token id past the vocabulary", {"prompt": [VOCAB]}, 400),
    ("prompt token id 2^64", {"prompt": [1 << 64]}, 400),
    ("stop strings on the sim engine", {"stop": ["x" * 256] * 16}, 400),
    ("a stop string too long", {"stop": ["x" * 257]}, 400),
    ("ignore_eos", {"ignore_eos": True}, 200),
    ("stream with usage", {"stream": True, "stream_options": {"include_usage": True}}, 200),
]


def _send(url: str, name: str, fields: dict[str, Any]) -> tuple[int, Any]:
    body = {**BASE, **fields}
    if not body.get("stream"):
        return http_json(url + "/v1/completions", body, timeout=120)
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.status, response.read().decode()


def test_extreme_but_legal_fields_to_a_node_that_is_being_stolen_from(cluster_factory):
    """Each row is sent while node1 steals from node0's queue: 200 or 4xx, both nodes stay up,
    and every other request completes with its exact tokens."""
    cluster = cluster_factory(2, ["--sim-decode-step-ms", "2"],
                              per_node_args=[["--max-num-seqs", "2"], ["--max-num-seqs", "4"]])
    origin, thief = cluster.nodes
    background: dict[int, dict[str, Any]] = {}

    def load() -> None:
        with ThreadPoolExecutor(12) as pool:
            background.update(zip(range(24), pool.map(lambda i: complete(origin.url, i, 60), range(24))))

    loader = threading.Thread(target=load)
    loader.start()
    wait_for(lambda: origin.stats()["load"]["pending"] >= 4)
    with ThreadPoolExecutor(len(EXTREMES)) as pool:
        answers = list(pool.map(lambda row: _send(origin.url, row[0], row[1]), EXTREMES))
    loader.join(120)

    served_by = set()
    for (name, fields, status), (got, body) in zip(EXTREMES, answers):
        assert got == status, f"{name}: {got} {body}"
        if status == 200 and not fields.get("stream"):
            tokens = body["choices"][0]["token_ids"]
            prompt = fields.get("prompt", BASE["prompt"])
            seed = fields.get("seed", BASE["seed"])
            max_tokens = fields.get("max_tokens", BASE["max_tokens"])
            expected = expected_tokens(seed, prompt, max_tokens, VOCAB)
            stops = set(fields.get("stop_token_ids", []))
            cut = next((k + 1 for k, t in enumerate(expected) if t in stops), len(expected))
            assert tokens == expected[:cut], name
            served_by.add(body["p2psched"]["served_by"])
        elif status == 200:
            assert body.rstrip().endswith("data: [DONE]") and '"usage"' in body, name
        else:
            assert set(body["error"]) == {"message", "type", "param", "code"}, name
    assert thief.name in served_by  # some of the extreme rows ran on the thief
    assert len(background) == 24
    for i, body in background.items():
        assert body["choices"][0]["token_ids"] == expected_for(i, 60)
    for node in (origin, thief):
        stats = node.stats()["stats"]
        assert node.is_healthy() and stats["loop_errors"] == {} and stats["unsendable"] == 0
    assert origin.stats()["stats"]["stolen_out"] > 0 and origin.stats()["stats"]["failed"] == 0


GARBAGE_RECORDS: list[dict[str, str]] = [
    {"node_id": "bad-endpoint", "steal_endpoint": "tcp://no such host:1", "result_endpoint": "tcp://h:2"},
    {"node_id": "bad-port", "steal_endpoint": "tcp://127.0.0.1:99999", "result_endpoint": "tcp://127.0.0.1:2"},
    {"node_id": "ipc", "steal_endpoint": "ipc:///tmp/x", "result_endpoint": "inproc://y"},
    {"node_id": "empty", "steal_endpoint": "", "result_endpoint": ""},
    {"node_id": "bad-load", "steal_endpoint": "tcp://127.0.0.1:1", "result_endpoint": "tcp://127.0.0.1:2",
     "pending": "lots"},
    {"node_id": "huge-load", "steal_endpoint": "tcp://127.0.0.1:1", "result_endpoint": "tcp://127.0.0.1:2",
     "pending": str(1 << 70)},
    {"node_id": "bad key", "steal_endpoint": "tcp://127.0.0.1:1", "result_endpoint": "tcp://127.0.0.1:2"},
    {"node_id": "x" * 300, "steal_endpoint": "tcp://127.0.0.1:1", "result_endpoint": "tcp://127.0.0.1:2"},
    {"node_id": "no-endpoints"},
]


def test_garbage_node_records_are_skipped_and_every_node_keeps_serving(cluster_factory):
    cluster = cluster_factory(3)
    info = cluster.nodes[0].stats()
    client = redis_lib.Redis(port=cluster.redis.port)
    topic = cluster.nodes[0].args[cluster.nodes[0].args.index("--scheduler-topic") + 1]
    for record in GARBAGE_RECORDS:
        node_id = record["node_id"]
        fields = {"name": f"garbage-{node_id[:10]}", "version": str(PROTOCOL_VERSION), "model_id": info["model_id"],
                  "http_url": "", "started_at": "0", "updated_at": str(time.time()), "pending": "50", **record}
        client.hset(f"p2psched:{{{topic}.0}}:node:{node_id}", mapping=fields)
        client.zadd(f"p2psched:{{{topic}.0}}:load", {node_id: 50})  # the most loaded peers, on paper
    wait_for(lambda: all(n.stats()["stats"]["bad_peer_records"] > 0 for n in cluster.nodes), timeout=10)
    with ThreadPoolExecutor(30) as pool:
        bodies = list(pool.map(lambda i: complete(cluster.nodes[0].url, i, 30), range(30)))
    for i, body in enumerate(bodies):
        assert body["choices"][0]["token_ids"] == expected_for(i, 30)
    for node in cluster.nodes:
        snapshot = node.stats()
        assert node.is_healthy() and snapshot["stats"]["loop_errors"] == {}
        assert not any(name.startswith("garbage") for name in snapshot["peers"])
    assert cluster.nodes[0].stats()["stats"]["stolen_out"] > 0  # the real peers still steal


def test_loads_stay_fresh_while_redis_is_down(cluster_factory):
    """Redis goes away while every node is idle (so last-known loads are all 0); then one node
    gets a queue. The idle nodes probe their peers directly, see it, and steal."""
    cluster = cluster_factory(3, ["--sim-decode-step-ms", "10"])
    origin = cluster.nodes[0]
    cluster.redis.stop()
    wait_for(lambda: all(node.stats()["registry_stale"] for node in cluster.nodes), timeout=10)
    with ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(lambda i: complete(origin.url, i, 40), range(16)))
    for i, body in enumerate(bodies):
        assert body["choices"][0]["token_ids"] == expected_for(i, 40)
    stats = {n.name: n.stats()["stats"] for n in cluster.nodes}
    assert stats["node0"]["stolen_out"] > 0, stats
    assert stats["node1"]["probes_sent"] + stats["node2"]["probes_sent"] > 0
    assert all(s["failed"] == 0 and s["loop_errors"] == {} for s in stats.values())


def test_a_thief_with_a_shorter_context_only_gets_what_it_can_run(cluster_factory):
    cluster = cluster_factory(2, ["--sim-decode-step-ms", "5"],
                              per_node_args=[[], ["--sim-max-model-len", "64"]])
    origin, thief = cluster.nodes
    lengths = {i: 20 + (i * 37) % 200 for i in range(24)}  # prompt ~35 tokens: some fit in 64, most not
    with ThreadPoolExecutor(24) as pool:
        bodies = dict(zip(lengths, pool.map(lambda i: complete(origin.url, i, lengths[i]), lengths)))
    for i, body in bodies.items():
        assert body["choices"][0]["token_ids"] == expected_for(i, lengths[i])
        if body["p2psched"]["served_by"] == thief.name:
            assert body["usage"]["prompt_tokens"] + lengths[i] <= 64
    assert origin.stats()["stats"]["failed"] == 0
    assert thief.stats()["stats"]["stolen_in"] > 0


def test_a_port_in_use_is_one_line_and_exit_2(cluster_factory):
    cluster = cluster_factory(1)
    busy = cluster.nodes[0].port
    for flag in ("--port", "--steal-port"):
        result = subprocess.run([sys.executable, "-m", "p2psched.server", "--engine", "sim", flag, str(busy)]
                                + (["--port", "0"] if flag != "--port" else []),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "in use" in lines[0], result.stderr
    assert cluster.nodes[0].is_healthy()


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb"])
def test_lone_surrogates_are_a_400(cluster_factory, text):
    node = cluster_factory(1).nodes[0]
    status, body = http_json(node.url + "/v1/completions", {"prompt": text, "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = http_json(node.url + "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": text}], "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "messages"


def test_extreme_sampling_fields_on_the_real_engine(cluster_factory):
    """The sim engine ignores sampling fields; the tiny model's sampler gets the extremes too."""
    node = cluster_factory(1, ["--max-num-seqs", "4"], base=["--engine", "real"], scheduler_name="local").nodes[0]
    rows = [{"temperature": 100.0}, {"temperature": 5e-324}, {"temperature": 1.0, "top_p": 5e-324},
            {"temperature": 1.0, "top_k": MAX_TOP_K}, {"temperature": 0.7, "top_k": 1, "top_p": 1.0},
            {"stop": ["\u00e9" * 256] * 16}, {"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS))},
            {"prompt": "x" * 500, "max_tokens": 4}]
    with ThreadPoolExecutor(len(rows)) as pool:
        answers = list(pool.map(lambda row: http_json(node.url + "/v1/completions",
                                                      {"prompt": "hello", "max_tokens": 12, "seed": 3, **row}),
                                rows))
    for row, (status, body) in zip(rows, answers):
        assert status == 200, (row, body)
        assert body["choices"][0]["finish_reason"] in ("stop", "length"), row
    greedy = http_json(node.url + "/v1/completions", {"prompt": "hello", "max_tokens": 12, "temperature": 0})[1]
    assert answers[1][1]["choices"][0]["text"] == greedy["choices"][0]["text"]  # tiny temperature = greedy
    assert node.is_healthy() and node.stats()["stats"]["loop_errors"] == {}


def test_a_steal_meant_for_a_previous_process_on_these_ports_leases_nothing(cluster_factory):
    """After a restart on the same ports, thieves may still address the old node id: the new
    process answers "wrong_node" and leases nothing (the thief would have dropped the grant)."""
    import zmq

    from p2psched import PROTOCOL_VERSION
    from p2psched.core.protocol import Grant, Steal, decode, encode

    from .helpers import register_fake_peer

    cluster = cluster_factory(1, ["--max-num-seqs", "1", "--sim-decode-step-ms", "20"])
    node = cluster.nodes[0]
    info = node.stats()
    register_fake_peer(cluster, "thief-x", info["model_id"], name="thief-x")
    wait_for(lambda: "thief-x" in node.stats()["peers"], timeout=10)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(complete, node.url, i, 30) for i in range(6)]
        wait_for(lambda: node.stats()["load"]["pending"] >= 4)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, b"thief-x")
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.connect(info["steal_endpoint"])
        sock.send(encode(Steal(PROTOCOL_VERSION, "s1", "an-old-node-id", "thief-x", "x", info["model_id"], 4,
                               100_000, 4096)))
        grant = decode(sock.recv())
        sock.close()
        assert isinstance(grant, Grant) and grant.reason == "wrong_node" and grant.tasks == []
        for i, future in enumerate(futures):
            assert future.result(60)["choices"][0]["token_ids"] == expected_for(i, 30)
    assert node.stats()["stats"]["stolen_out"] == 0


def test_json_nested_past_the_parsers_depth_is_a_400(cluster_factory):
    node = cluster_factory(1, scheduler_name="local").nodes[0]
    request = urllib.request.Request(node.url + "/v1/completions", data=b"[" * 50_000,
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=30)
        status = 200
    except urllib.error.HTTPError as exc:
        status = exc.code
    assert status == 400 and node.stats()["stats"]["loop_errors"] == {}

"""The serving surface against real node processes: OpenAI's own client, metrics, client
disconnects, and FastDeploy's launch line joining a running cluster."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import urllib.request

import openai
import pytest
import redis

from p2psched.cluster import Cluster, http_json
from p2psched.redis_server import free_port

from .helpers import wait_for

REAL = ["--engine", "real", "--model", "tiny", "--cpu-threads", "1", "--heartbeat-interval", "0.3",
        "--lease-timeout", "2.0"]



@pytest.fixture(scope="module")
def node(tmp_path_factory):
    cluster = Cluster(1, REAL + ["--metrics-port", str(free_port())], scheduler_name="local",
                      log_dir=str(tmp_path_factory.mktemp("openai")))
    try:
        yield cluster.start().nodes[0]
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def client(node):
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completions_with_the_openai_client(client):
    done = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0, seed=1,
                                     extra_body={"ignore_eos": True})
    assert done.id.startswith("cmpl-") and done.object == "text_completion"
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 12 and done.usage.prompt_tokens == len("Hello") + 1
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0, seed=1,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-2].model_extra["p2psched"]["served_by"] == "node0"


def test_chat_completions_with_the_openai_client(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]
    done = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0.7, seed=5,
                                          extra_body={"ignore_eos": True})
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    assert done.usage.completion_tokens == 10
    assert done.model_extra["p2psched"] == {"origin": "node0", "served_by": "node0", "attempts": 1}
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0.7,
                                                 seed=5, stream=True, extra_body={"ignore_eos": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == done.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == "length"


def test_errors_reach_the_openai_client_typed(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=-5)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user"}], max_tokens=2)


def test_metrics_in_prometheus_text_on_both_ports(node, client):
    client.completions.create(model="tiny", prompt="count me", max_tokens=3)
    metrics_port = node.args[node.args.index("--metrics-port") + 1]
    for url in (f"http://127.0.0.1:{metrics_port}/metrics", node.url + "/metrics"):
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for name in ("p2psched_requests_total", "p2psched_queue_length", "p2psched_running_sequences",
                     "p2psched_kv_usage_ratio", "p2psched_load_score", "p2psched_steals_total",
                     "p2psched_requests_stolen_in_total", "p2psched_tokens_forwarded_total",
                     "p2psched_lease_expiries_total", "p2psched_time_to_first_token_seconds_bucket",
                     "p2psched_inter_token_seconds_bucket", "p2psched_e2e_latency_seconds_count"):
            assert name in text, name
        completed = [line for line in text.splitlines() if line.startswith('p2psched_requests_total{node="node0",'
                                                                           'outcome="completed"}')]
        assert completed and float(completed[0].split()[-1]) >= 1


def test_a_full_node_answers_429_with_retry_after(tmp_path):
    with Cluster(1, REAL + ["--max-concurrent-requests", "1", "--max-num-seqs", "1", "--min-step-ms", "30"],
                 scheduler_name="local", log_dir=str(tmp_path)) as cluster:
        url = cluster.nodes[0].url
        holder = threading.Thread(target=http_json, args=(url + "/v1/completions",
                                                          {"prompt": "hold", "max_tokens": 60, "ignore_eos": True}))
        holder.start()
        wait_for(lambda: cluster.nodes[0].stats()["load"]["running"] == 1)
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps({"prompt": "x"}).encode())
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == 429 and info.value.headers["Retry-After"] == "1"
        assert json.loads(info.value.read())["error"]["type"] == "rate_limit_error"
        holder.join(60)


def open_stream(url: str, prompt: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 1500, "stream": True,
                                                        "ignore_eos": True}),
                 {"Content-Type": "application/json"})
    return conn


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_client_disconnect_frees_slots_and_kv_on_the_node_that_ran_it(cluster_factory):
    """Three streams to node0 (one slot): one runs there, one waits, one is stolen by node1.
    The clients hang up; both nodes end with nothing running and no KV blocks in use."""
    cluster = cluster_factory(2, ["--max-num-seqs", "1", "--min-step-ms", "40", "--scheduler-min-load-score", "1"],
                              base=REAL)
    origin, thief = cluster.nodes
    conns = [open_stream(origin.url, f"long story {i}") for i in range(3)]
    responses = []
    for conn in conns:
        responses.append(conn.getresponse())
        assert responses[-1].status == 200
    wait_for(lambda: thief.stats()["load"]["running"] == 1 and origin.stats()["load"]["running"] == 1)
    # The engine's stats arrive with its next step's outputs (its own process reports them).
    wait_for(lambda: metric(thief.url, "p2psched_kv_blocks_used") > 0, timeout=30)
    for response, conn in zip(responses, conns):
        response.fp.readline()
        conn.sock.close()
        conn.close()
    for n in (origin, thief):
        wait_for(lambda n=n: metric(n.url, "p2psched_running_sequences") == 0
                 and metric(n.url, "p2psched_queue_length") == 0 and metric(n.url, "p2psched_kv_blocks_used") == 0)
    assert origin.stats()["stats"]["cancelled"] == 3
    # The waiting one may be stolen too: the thief's slot frees when the first hang-up reaches it,
    # and the origin's queue head is as grantable as any (decision 41).
    assert thief.stats()["stats"]["stolen_in"] in (1, 2) and thief.stats()["engine"]["kv_blocks_free"] == \
        thief.stats()["engine"]["kv_blocks_total"]


def test_fastdeploy_launch_line_joins_a_running_cluster(cluster_factory, tmp_path):
    cluster = cluster_factory(2, ["--max-num-seqs", "1", "--min-step-ms", "30", "--scheduler-min-load-score", "2"],
                              base=REAL, topic="default")
    port, metrics_port = free_port(), free_port()
    line = (f'exec {sys.executable} -m p2psched.server --port {port} --metrics-port {metrics_port} --model tiny '
            f'--scheduler-name global --scheduler-ttl 900 --scheduler-host "127.0.0.1" '
            f'--scheduler-port {cluster.redis.port} --scheduler-db 0 --scheduler-password "" '
            f'--scheduler-topic "default" --scheduler-min-load-score 3 --scheduler-load-shards-num 1')
    log = open(tmp_path / "launched.log", "wb")
    proc = subprocess.Popen(line, shell=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _healthy(url))
        keys = redis.Redis(port=cluster.redis.port)
        wait_for(lambda: sum(1 for _ in keys.scan_iter("p2psched:{default.0}:node:*")) == 3)
        wait_for(lambda: all(len(n.stats()["peers"]) == 2 for n in cluster.nodes))
        assert urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).status == 200
        # It takes work from a loaded peer like any other node.
        senders = [threading.Thread(target=http_json, args=(cluster.nodes[0].url + "/v1/completions",
                                                            {"prompt": f"p{i}", "max_tokens": 40,
                                                             "ignore_eos": True}))
                   for i in range(10)]
        for t in senders:
            t.start()
        wait_for(lambda: http_json(url + "/stats")[1]["stats"]["stolen_in"] > 0)
        for t in senders:
            t.join(120)
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
        log.close()
    assert (tmp_path / "launched.log").read_text().count("up: http") == 1


def _healthy(url: str) -> bool:
    try:
        return http_json(url + "/health", timeout=1)[0] == 200
    except OSError:
        return False

"""Failures with real processes: a thief killed mid-stream, Redis taken away, a fake thief."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import zmq

from p2psched import PROTOCOL_VERSION
from p2psched.cluster import http_json
from p2psched.core.protocol import Cancel, Grant, Steal, TokenItem, Tokens, decode, encode

from .conftest import FAST
from .helpers import complete, expected_for, prompt_for, register_fake_peer, stream, wait_for


def test_kill_9_of_a_thief_mid_stream_loses_nothing(cluster_factory):
    cluster = cluster_factory(3)
    origin = cluster.nodes[0]
    n, max_tokens = 24, 120
    with ThreadPoolExecutor(n) as pool:
        futures = {i: pool.submit(stream, origin.url, i, max_tokens) for i in range(n)}
        # Kill the first thief seen running stolen work, while it streams.
        victim = wait_for(lambda: next((node for node in cluster.nodes[1:]
                                        if node.stats()["load"]["running"] > 0
                                        and node.stats()["stats"]["token_items_forwarded"] > 0), None))
        victim.kill()
        results = {i: f.result(timeout=120) for i, f in futures.items()}

    resumed = 0
    for i, (chunks, last) in results.items():
        tokens = [t for chunk in chunks for t in chunk]
        assert tokens == expected_for(i, max_tokens), f"request {i}: gap or duplicate in the stream"
        assert last["choices"][0]["finish_reason"] == "length"
        if last["p2psched"]["attempts"] > 1:
            resumed += 1
            assert last["p2psched"]["served_by"] != victim.name
    stats = origin.stats()["stats"]
    assert resumed >= 1 and stats["resumed"] >= 1
    assert stats["completed"] == n and stats["failed"] == 0


def test_redis_outage_fails_nothing_and_nodes_reregister(cluster_factory):
    cluster = cluster_factory(3)
    origin = cluster.nodes[0]
    results: dict[int, dict] = {}

    def client() -> None:
        for i in range(40):
            results[i] = complete(origin.url, i, 20 + i % 30)
            time.sleep(0.05)

    sender = threading.Thread(target=client)
    sender.start()
    time.sleep(0.5)
    cluster.redis.stop()
    wait_for(lambda: all(node.stats()["registry_stale"] for node in cluster.nodes), timeout=10)
    time.sleep(1.0)
    cluster.redis.start()
    back = time.monotonic()
    import redis as redis_lib

    client_redis = redis_lib.Redis(port=cluster.redis.port)
    wait_for(lambda: sum(1 for k in client_redis.scan_iter("p2psched:*:node:*")) == 3, timeout=10, interval=0.01)
    elapsed = time.monotonic() - back
    heartbeat = float(FAST[FAST.index("--heartbeat-interval") + 1])
    assert elapsed <= 2 * heartbeat, f"re-registered after {elapsed:.2f}s"
    sender.join(60)
    assert len(results) == 40
    for i, body in results.items():
        assert body["choices"][0]["token_ids"] == expected_for(i, 20 + i % 30)
    assert all(node.stats()["stats"]["failed"] == 0 for node in cluster.nodes)
    assert sum(node.stats()["stats"]["registry_errors"] for node in cluster.nodes) > 0


def test_fake_thief_repeated_steal_stale_epoch_and_resume(cluster_factory):
    """A raw ZeroMQ thief: same steal id gets the same grant; a stale epoch is dropped and
    cancelled; tokens it did send are kept when the origin takes the request back."""
    cluster = cluster_factory(1, ["--max-num-seqs", "1", "--sim-decode-step-ms", "20"])
    node = cluster.nodes[0]
    info = node.stats()
    n, max_tokens = 6, 40
    with ThreadPoolExecutor(n) as pool:
        futures = {i: pool.submit(complete, node.url, i, max_tokens) for i in range(n)}
        wait_for(lambda: node.stats()["load"]["pending"] >= 4)

        register_fake_peer(cluster, "fake-thief", info["model_id"])
        wait_for(lambda: "fake" in node.stats()["peers"], timeout=10)
        ctx = zmq.Context.instance()
        steal_sock = ctx.socket(zmq.DEALER)
        result_sock = ctx.socket(zmq.DEALER)
        for sock in (steal_sock, result_sock):
            sock.setsockopt(zmq.ROUTING_ID, b"fake-thief")
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, 5000)
        steal_sock.connect(info["steal_endpoint"])
        result_sock.connect(info["result_endpoint"])
        steal = Steal(PROTOCOL_VERSION, "steal-1", info["node_id"], "fake-thief", "fake", info["model_id"], 1, 100_000, 4096)
        steal_sock.send(encode(steal))
        first = steal_sock.recv()
        steal_sock.send(encode(steal))
        again = steal_sock.recv()
        assert first == again
        grant = decode(first)
        assert isinstance(grant, Grant) and len(grant.tasks) == 1
        task = grant.tasks[0]
        i = next(k for k in range(n) if task.prompt_token_ids == list(prompt_for(k).encode()))
        truth = expected_for(i, max_tokens)

        stale = Tokens(PROTOCOL_VERSION, "fake-thief", "fake", [TokenItem(task.request_id, task.epoch + 1, 0, [1])])
        result_sock.send(encode(stale))
        cancel = decode(result_sock.recv())
        assert isinstance(cancel, Cancel) and cancel.request_id == task.request_id
        assert node.stats()["stats"]["stale_items"] == 1

        good = Tokens(PROTOCOL_VERSION, "fake-thief", "fake",
                      [TokenItem(task.request_id, task.epoch, 0, truth[:3])])
        result_sock.send(encode(good))
        # Then the fake thief goes silent: its lease expires and the origin finishes the request.
        results = {k: f.result(timeout=60) for k, f in futures.items()}
        steal_sock.close()
        result_sock.close()

    body = results[i]
    assert body["choices"][0]["token_ids"] == truth
    assert body["p2psched"]["attempts"] == 2 and body["p2psched"]["served_by"] == "node0"
    stats = node.stats()["stats"]
    assert stats["lease_expiries"] == 1 and stats["stolen_out"] == 1
    for k, other in results.items():
        assert other["choices"][0]["token_ids"] == expected_for(k, max_tokens)


def test_sigterm_drains_in_flight_requests_and_deregisters(cluster_factory):
    cluster = cluster_factory(1, ["--max-num-seqs", "2"])
    node = cluster.nodes[0]
    import redis as redis_lib

    client_redis = redis_lib.Redis(port=cluster.redis.port)
    assert sum(1 for _ in client_redis.scan_iter("p2psched:*:node:*")) == 1
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(complete, node.url, i, 60) for i in range(6)]
        wait_for(lambda: node.stats()["stats"]["received"] == 6)  # all accepted: 2 running, 4 queued
        assert node.stats()["load"]["running"] == 2
        code = node.terminate()
        bodies = [f.result(timeout=60) for f in futures]
    assert code == 0
    for i, body in enumerate(bodies):
        assert body["choices"][0]["token_ids"] == expected_for(i, 60)
    assert sum(1 for _ in client_redis.scan_iter("p2psched:*:node:*")) == 0
    status, _ = (None, None)
    try:
        status, _ = http_json(node.url + "/health", timeout=1)
    except OSError:
        pass
    assert status is None


def test_a_thief_frees_the_slots_of_an_origin_that_died(cluster_factory):
    """kill -9 of the origin while a thief runs its requests: the thief notices the silence
    (no heartbeat acks for two lease timeouts), drops the tasks and frees their slots."""
    cluster = cluster_factory(2, ["--max-num-seqs", "1", "--sim-decode-step-ms", "20"])
    origin, thief = cluster.nodes
    pool = ThreadPoolExecutor(4)
    for i in range(4):
        pool.submit(complete, origin.url, i, 2000)
    wait_for(lambda: thief.stats()["load"]["running"] == 1)
    origin.kill()
    stats = wait_for(lambda: (s := thief.stats())["load"]["running"] == 0 and s["stats"]["origin_losses"] >= 1 and s,
                     timeout=30)
    assert stats["load"]["pending"] == 0 and stats["stats"]["stolen_in_completed"] == 0
    assert thief.is_healthy()
    pool.shutdown(wait=False, cancel_futures=True)


def test_a_thief_whose_engine_hangs_stops_vouching_and_its_work_is_resumed(cluster_factory):
    """The thief's engine hangs in a step (SIGUSR1 -> --sim-stall-s) while its event loop runs
    on: its heartbeats stop vouching for the stolen tasks, their leases lapse, the origin resumes
    them, every stream is exact, and /health says engine_stalled meanwhile."""
    import signal

    cluster = cluster_factory(2, ["--max-num-seqs", "2", "--sim-decode-step-ms", "20"],
                              per_node_args=[[], ["--sim-stall-s", "6"]])
    origin, thief = cluster.nodes
    n, max_tokens = 8, 150
    with ThreadPoolExecutor(n) as pool:
        futures = {i: pool.submit(stream, origin.url, i, max_tokens) for i in range(n)}
        wait_for(lambda: thief.stats()["stats"]["token_items_forwarded"] > 0)
        assert thief.proc is not None
        thief.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: http_json(thief.url + "/health", timeout=2)[1].get("status") == "engine_stalled",
                 timeout=10)
        stolen = thief.stats()["stats"]["stolen_in"]
        wait_for(lambda: origin.stats()["stats"]["lease_expiries"] >= 1, timeout=10)
        time.sleep(1.0)  # the thief has free slots again (its tasks were taken back): it must not steal
        assert http_json(thief.url + "/health", timeout=2)[1].get("status") == "engine_stalled"
        assert thief.stats()["stats"]["stolen_in"] == stolen  # a hung engine steals nothing
        results = {i: f.result(timeout=120) for i, f in futures.items()}
    for i, (chunks, last) in results.items():
        assert [t for chunk in chunks for t in chunk] == expected_for(i, max_tokens), f"request {i}"
    stats = origin.stats()["stats"]
    assert stats["lease_expiries"] >= 1 and stats["resumed"] >= 1 and stats["failed"] == 0
    assert any(last["p2psched"]["attempts"] > 1 for _, last in results.values())
    wait_for(lambda: thief.is_healthy(), timeout=20)  # the step ends; the thief serves again

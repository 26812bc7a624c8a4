"""A node whose queue grows answers its idle peers' latest probes again at once (``node._offer_queue``)."""

from concurrent.futures import ThreadPoolExecutor

from .helpers import complete, expected_for, wait_for


def test_a_queued_request_is_offered_to_a_peer_that_probed_lately(cluster_factory):
    cluster = cluster_factory(2, ["--sim-decode-step-ms", "20", "--max-num-seqs", "1"])
    origin, thief = cluster.nodes
    wait_for(lambda: thief.name in origin.stats()["peers"])  # the origin answers probes of members only
    sent = thief.stats()["stats"]["probes_sent"]
    wait_for(lambda: thief.stats()["stats"]["probes_sent"] > sent + 3)  # idle: it probes the origin every 20 ms
    with ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda i: complete(origin.url, i, 30), range(4)))
    for i, body in enumerate(bodies):
        assert body["choices"][0]["token_ids"] == expected_for(i, 30)
    stats = {n.name: n.stats()["stats"] for n in cluster.nodes}
    assert stats["node0"]["offers_sent"] > 0, stats  # the queue grew while node1 had probed within 50 ms
    assert stats["node0"]["stolen_out"] > 0 and stats["node1"]["loop_errors"] == {}, stats

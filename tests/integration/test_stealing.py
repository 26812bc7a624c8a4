"""Three real node processes, a real Redis: requests sent to one node are stolen by the others."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from .helpers import complete, expected_for


def test_sixty_requests_to_one_node_are_shared_and_exact(cluster_factory):
    cluster = cluster_factory(3)
    origin = cluster.nodes[0]
    lengths = {i: 10 + (i * 7) % 50 for i in range(60)}
    with ThreadPoolExecutor(60) as pool:
        results = dict(zip(lengths, pool.map(lambda i: complete(origin.url, i, lengths[i]), lengths)))

    served_by = Counter()
    for i, body in results.items():
        assert body["choices"][0]["token_ids"] == expected_for(i, lengths[i]), f"request {i}"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == lengths[i]
        assert body["p2psched"]["origin"] == "node0"
        served_by[body["p2psched"]["served_by"]] += 1
    assert len({body["id"] for body in results.values()}) == 60
    assert served_by["node1"] + served_by["node2"] > 0, served_by

    stats = {n.name: n.stats()["stats"] for n in cluster.nodes}
    assert stats["node0"]["received"] == 60 and stats["node0"]["completed"] == 60
    assert stats["node0"]["ran_locally"] == served_by["node0"]
    assert stats["node0"]["stolen_out"] == stats["node1"]["stolen_in"] + stats["node2"]["stolen_in"]
    for thief in ("node1", "node2"):
        assert stats[thief]["stolen_in"] == served_by[thief]
        assert stats[thief]["stolen_in_completed"] == served_by[thief]
    assert stats["node0"]["resumed"] == 0 and stats["node0"]["stale_items"] == 0

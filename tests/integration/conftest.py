"""Fixtures for tests that need real parts: a real redis-server, real sockets, real processes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from p2psched.cluster import Cluster
from p2psched.redis_server import EmbeddedRedis

# Fast timings so failures are detected within a second or two.
FAST = ["--engine", "sim", "--heartbeat-interval", "0.3", "--lease-timeout", "1.0", "--steal-timeout", "0.2",
        "--scheduler-min-load-score", "2", "--max-num-seqs", "4", "--sim-decode-step-ms", "4"]


@pytest.fixture
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def cluster_factory(tmp_path) -> Iterator:
    """Start clusters of real node processes; dump their logs when a test fails."""
    started: list[Cluster] = []

    def start(num_nodes: int, extra: list[str] | None = None, base: list[str] | None = None, **kwargs) -> Cluster:
        kwargs.setdefault("topic", f"t{uuid.uuid4().hex[:8]}")
        cluster = Cluster(num_nodes, (FAST if base is None else base) + (extra or []),
                          log_dir=str(tmp_path / f"cluster{len(started)}"), **kwargs)
        started.append(cluster)
        return cluster.start()

    yield start
    for cluster in started:
        cluster.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        tmp = item.funcargs.get("tmp_path")
        if tmp is not None:
            for log in sorted(tmp.glob("cluster*/*.log")):
                report.sections.append((f"log {log.parent.name}/{log.name}", log.read_text(errors="replace")[-4000:]))

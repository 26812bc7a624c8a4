"""Prometheus metrics of a node (prometheus-client, text exposition format).

Counters and gauges are read from one ``NodeSnapshot`` per scrape (``service.py``) by
one collector, so nothing on the hot path updates a metric twice. Latency histograms (TTFT,
inter-token, end-to-end) are observed by the HTTP layer as it streams.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .service import NodeService

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _NodeCollector:
    def __init__(self, node: NodeService):
        self._node = node

    def collect(self) -> Iterator[Metric]:
        node = self._node.snapshot()  # one moment per scrape
        s = node.stats
        labels = ["node"]
        name = [node.name]

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(metric, doc, labels=labels)
            family.add_metric(name, value)
            return family

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(metric, doc, labels=labels)
            family.add_metric(name, value)
            return family

        outcomes = CounterMetricFamily("p2psched_requests", "Client requests by outcome",
                                       labels=["node", "outcome"])
        for outcome, value in (("completed", s.completed), ("failed", s.failed), ("cancelled", s.cancelled),
                               ("rejected", s.rejected)):
            outcomes.add_metric([node.name, outcome], value)
        yield outcomes
        yield counter("p2psched_requests_received", "Requests accepted from clients", s.received)
        steals = CounterMetricFamily("p2psched_steals", "Steal RPCs sent, by result", labels=["node", "result"])
        for result, value in (("granted", s.steals_granted), ("empty", s.steals_empty),
                              ("timeout", s.steals_timed_out), ("wrong_node", s.steals_wrong_node)):
            steals.add_metric([node.name, result], value)
        yield steals
        yield counter("p2psched_late_grants", "Grants applied after their steal timed out", s.late_grants)
        yield counter("p2psched_grants_replayed", "Repeated steal ids answered with the cached grant",
                      s.grants_replayed)
        yield counter("p2psched_steals_attempted", "Steal RPCs sent", s.steals_attempted)
        yield counter("p2psched_requests_stolen_out", "Own requests granted to thieves", s.stolen_out)
        yield counter("p2psched_requests_stolen_in", "Requests taken from victims", s.stolen_in)
        yield counter("p2psched_requests_resumed", "Own requests taken back from a thief", s.resumed)
        yield counter("p2psched_tokens_forwarded", "Tokens streamed to origins", s.tokens_forwarded)
        yield counter("p2psched_lease_expiries", "Leases that expired (thief silent)", s.lease_expiries)
        yield counter("p2psched_stream_gaps", "Token streams with a sequence gap", s.stream_gaps)
        yield counter("p2psched_registry_errors", "Failed registry round trips", s.registry_errors)
        for metric, doc, label, values in (
                ("p2psched_grants_dropped", "Grants a thief did not apply, by reason", "reason", s.grants_dropped),
                ("p2psched_malformed_messages_dropped", "Bad ZeroMQ frames dropped", "socket", s.malformed),
                ("p2psched_unauthorized_messages_dropped",
                 "Well-formed messages refused: the sender may not speak for the node id it names", "socket",
                 s.unauthorized),
                ("p2psched_loop_errors", "Errors contained at a loop's boundary (a bug if ever > 0)", "loop",
                 s.loop_errors)):
            family = CounterMetricFamily(metric, doc, labels=["node", label])
            for key, value in sorted(values.items()):
                family.add_metric([node.name, key], value)
            yield family
        yield counter("p2psched_bad_peer_records", "Registry records skipped as unusable", s.bad_peer_records)
        yield counter("p2psched_tasks_handed_back", "Stolen tasks given back to their origins unrun", s.handed_back)
        yield counter("p2psched_handbacks_received", "Own tasks thieves gave back unrun", s.handbacks_received)
        yield counter("p2psched_sends_failed", "Sends refused at once (no live peer, byte budget spent)",
                      s.sends_failed)
        yield counter("p2psched_send_budget_refusals", "Sends refused because the peer's queued bytes hit the budget",
                      s.send_budget_refusals)
        yield counter("p2psched_load_probes_sent", "Queue probes sent to peers (how long their queues are, and how old)",
                      s.probes_sent)
        yield gauge("p2psched_send_queue_bytes", "Bytes handed to ZeroMQ that peers have not taken yet",
                    node.queued_send_bytes)
        yield counter("p2psched_engine_busy_seconds", "Time the engine spent in steps", s.busy_s)
        load = node.load
        yield gauge("p2psched_queue_length", "Pending (not started) requests", load["pending"])
        yield gauge("p2psched_running_sequences", "Sequences in the engine", load["running"])
        yield gauge("p2psched_load_score", "Load score published to the registry", load["pending"])
        yield gauge("p2psched_requests_in_flight", "Client requests accepted and not yet answered", node.in_flight)
        yield gauge("p2psched_leases_held", "Own requests leased to thieves now", node.leases_held)
        yield gauge("p2psched_stolen_in_active", "Tasks of other origins held here now", node.stolen_in_active)
        yield gauge("p2psched_scheduler_requests", "Requests the scheduler tracks (own and stolen-in)",
                    node.scheduler_requests)
        yield gauge("p2psched_kv_reserved_ratio", "KV capacity reserved by admitted requests",
                    1 - load["free_kv_tokens"] / max(1, node.max_kv_tokens))
        engine = node.engine  # the engine's stats that came with its last step
        if engine.kv_blocks_total:
            used = engine.kv_blocks_total - engine.kv_blocks_free
            yield gauge("p2psched_kv_blocks_used", "KV cache blocks in use", used)
            yield gauge("p2psched_kv_usage_ratio", "KV cache blocks in use / total", used / engine.kv_blocks_total)
            yield counter("p2psched_prefix_cache_hit_blocks", "KV blocks served by the prefix cache",
                          engine.prefix_cache_hit_blocks)
            yield counter("p2psched_preemptions", "Sequences preempted for KV space", engine.preemptions)

class NodeMetrics:
    def __init__(self, node: NodeService):
        self.registry = CollectorRegistry()
        self.registry.register(_NodeCollector(node))  # type: ignore[arg-type]
        labels = ["node"]
        self.ttft = Histogram("p2psched_time_to_first_token_seconds", "Arrival to first token, at the origin",
                              labels, buckets=_LATENCY_BUCKETS, registry=self.registry).labels(node.name)
        self.itl = Histogram("p2psched_inter_token_seconds", "Gap between streamed chunks at the origin (a chunk may carry several tokens)",
                             labels, buckets=_ITL_BUCKETS, registry=self.registry).labels(node.name)
        self.e2e = Histogram("p2psched_e2e_latency_seconds", "Arrival to last token, at the origin",
                             labels, buckets=_LATENCY_BUCKETS, registry=self.registry).labels(node.name)

    def render(self) -> bytes:
        return generate_latest(self.registry)

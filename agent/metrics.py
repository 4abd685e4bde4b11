"""Prometheus metrics at `/metrics` (`metrics.port`, off by default), with `prometheus_client`.

Per-request numbers are recorded as they happen; connection and model state are read from the
session and the service when Prometheus scrapes, so they can never drift from the truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


class AgentState(Collector):
    """Gauges and counters read from the running agent at scrape time."""

    def __init__(self, read: Callable[[], dict]) -> None:
        self._read = read

    def collect(self) -> Iterator:
        state = self._read()
        yield GaugeMetricFamily("allds_inflight", "Requests accepted and not yet acknowledged.", state["inflight"])
        yield GaugeMetricFamily("allds_mqtt_connected", "1 while connected to the broker.", int(state["connected"]))
        yield CounterMetricFamily("allds_mqtt_reconnects", "Connections made after the first.", state["reconnects"])
        yield CounterMetricFamily("allds_telemetry_dropped", "Life messages dropped from the full outbox.",
                                  state["telemetry_dropped"])
        info = InfoMetricFamily("allds_model", "The serving model.")
        info.add_metric([], {k: str(v) for k, v in state["model"].items()})
        yield info


class Metrics:
    """The agent's collectors in a registry of their own."""

    def __init__(self, read_state: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("allds_requests", "Requests answered, by result: the diagnosis, or the error code.",
                                ["result"], registry=self.registry)
        self.request_seconds = Histogram("allds_request_seconds", "End to end, from receipt to the answer's publish.",
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        self.decode_seconds = Histogram("allds_decode_seconds", "Parsing, decoding and preprocessing of one request.",
                                        buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inference_seconds = Histogram("allds_inference_seconds", "One model invocation (a micro-batch).",
                                           buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("allds_batch_size", "Requests per micro-batch.", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.registry.register(AgentState(read_state))

    def serve(self, port: int, bind: str) -> None:
        """Serve `/metrics` on a daemon thread."""
        start_http_server(port, bind, registry=self.registry)

    def answered(self, result: str, total_s: float, decode_s: float | None = None) -> None:
        self.requests.labels(result).inc()
        self.request_seconds.observe(total_s)
        if decode_s is not None:
            self.decode_seconds.observe(decode_s)

    def batch(self, size: int, inference_s: float) -> None:
        self.batch_size.observe(size)
        self.inference_seconds.observe(inference_s)

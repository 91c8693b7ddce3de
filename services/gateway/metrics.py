"""Prometheus metrics of the gateway, served over HTTP (`clsa serve --metrics-port`)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.gateway.backend import GenerationBackend
from services.transfer import TransferLedger, TransferState

# Latency buckets from 1 ms to ~30 s.
BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


class GatewayMetrics:
    """One registry per gateway (tests run several in one process)."""

    def __init__(self, backend: GenerationBackend, ledger: TransferLedger | None = None) -> None:
        self.registry = CollectorRegistry()
        if ledger is not None:
            self.registry.register(_TransfersByState(ledger))
        r = self.registry
        self.requests = Counter("clsa_requests", "Requests by final gRPC status", ["status"], registry=r)
        self.ttft = Histogram("clsa_ttft_seconds", "Time to first token", buckets=BUCKETS, registry=r)
        self.itl = Histogram("clsa_inter_token_latency_seconds", "Time between streamed tokens",
                             buckets=BUCKETS, registry=r)
        self.queue = Histogram("clsa_queue_seconds", "Admission to start of prefill", buckets=BUCKETS, registry=r)
        self.prefill = Histogram("clsa_prefill_seconds", "Prefill time", buckets=BUCKETS, registry=r)
        self.transfer = Histogram("clsa_transfer_seconds", "KV transfer, prefill to decode worker",
                                  buckets=BUCKETS, registry=r)
        self.decode = Histogram("clsa_decode_seconds", "First to last token", buckets=BUCKETS, registry=r)
        self.tokens = Counter("clsa_generated_tokens", "Tokens generated", registry=r)
        kv_used = Gauge("clsa_kv_blocks_in_use", "KV blocks held by running sequences", registry=r)
        kv_used.set_function(lambda: backend.stats().get("kv_blocks_used", 0))
        kv_total = Gauge("clsa_kv_blocks_total", "KV blocks in the pool", registry=r)
        kv_total.set_function(lambda: backend.stats().get("kv_blocks_total", 0))
        in_flight = Gauge("clsa_requests_in_flight", "Requests admitted and not finished", registry=r)
        in_flight.set_function(lambda: backend.stats().get("requests_in_flight", 0))

    def serve_http(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)


class _TransfersByState(Collector):
    """`clsa_transfers{state=...}`: ledger records by state, read from Redis at each scrape."""

    def __init__(self, ledger: TransferLedger) -> None:
        self.ledger = ledger

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("clsa_transfers", "KV transfers in the ledger by state", labels=["state"])
        records = self.ledger.records()
        for state in TransferState:
            family.add_metric([state.value], sum(r.state is state for r in records))
        yield family

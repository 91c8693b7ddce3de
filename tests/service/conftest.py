"""The disaggregated service, really started once per session: a redis-server, a local Ray
(namespace `clsa`) with one prefill and one decode worker, and the gateway on a free port."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import ray

from services.gateway.metrics import GatewayMetrics
from services.gateway.ray_backend import NAMESPACE, RayBackend, start_workers
from services.gateway.server import pb2_grpc
from services.transfer import TransferLedger, WorkerRegistry
from services.transfer.local_redis import LocalRedis
from tests.grpc_server import running_gateway

PREFIX = "clsa-test:"


@dataclass
class Service:
    address: str
    channel: grpc.Channel
    ledger: TransferLedger
    backend: RayBackend
    redis_url: str
    metrics: GatewayMetrics

    @property
    def stub(self):  # noqa: ANN201
        return pb2_grpc.GenerationStub(self.channel)


@pytest.fixture(scope="session")
def service() -> Iterator[Service]:
    redis_server = LocalRedis()
    ray.init(num_cpus=2, include_dashboard=False, namespace=NAMESPACE, logging_level="ERROR",
             log_to_driver=False)
    try:
        prefill, decode = start_workers("clsa-tiny", redis_server.url, PREFIX, 1, 1)
        ledger = TransferLedger.from_url(redis_server.url, prefix=PREFIX)
        registry = WorkerRegistry(ledger.client, prefix=PREFIX)
        backend = RayBackend(prefill, decode, registry, ledger)
        metrics = GatewayMetrics(backend, ledger)
        with running_gateway(backend, metrics) as address:
            channel = grpc.insecure_channel(address)
            yield Service(address, channel, ledger, backend, redis_server.url, metrics)
            channel.close()
    finally:
        ray.shutdown()
        redis_server.stop()
